"""Assemble README.md from docs/*.md (run `make readme` after editing a section).

Order: the core page, then each area; area pages start at heading level 2.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).parent
ORDER = ["_core.md", "evaluation.md", "image_io.md", "serving.md", "ecg.md",
         "genomics_molecules.md", "ehr.md", "_benchmarks.md", "_development.md"]


def demote(text: str) -> str:
    """Area pages written with a level-1 title become level-2 sections."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        out, in_code = [], False
        for line in lines:
            if line.startswith("```"):
                in_code = not in_code
            out.append("#" + line if not in_code and re.match(r"#+ ", line) else line)
        return "\n".join(out)
    return text


def main() -> None:
    parts = [DOCS.joinpath("_core.md").read_text().rstrip()]
    parts += [demote(DOCS.joinpath(name).read_text()).rstrip() for name in ORDER[1:]
              if DOCS.joinpath(name).exists()]
    body = "\n\n".join(parts) + "\n"
    (DOCS.parent / "README.md").write_text(body.replace("(docs/", "(docs/"))


if __name__ == "__main__":
    main()
