"""DNA sequence reading and encoding: FASTA, CSV/UCI tables, IUPAC one-hot.

Channels are ``A, C, G, T``. IUPAC ambiguity codes become fractional one-hot columns: ``N`` is
0.25 in every channel, two-base codes (``R`` = A/G, ``Y`` = C/T, ``S``, ``W``, ``K``, ``M``) 0.5
in each of their bases, three-base codes (``B``, ``D``, ``H``, ``V``) 1/3 each; ``U`` reads as
``T``; lower case is accepted. Anything else is a :class:`~meddx.errors.DataError` naming the
sequence and the offending characters — never silently dropped or mapped to ``N``.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddx.errors import DataError

__all__ = [
    "BASES",
    "IUPAC",
    "FASTA_SUFFIXES",
    "Record",
    "encode",
    "clean",
    "reverse_complement",
    "parse_fasta",
    "read_fasta",
    "is_fasta_path",
]

logger = logging.getLogger(__name__)

BASES = "ACGT"
IUPAC: dict[str, str] = {
    "A": "A", "C": "C", "G": "G", "T": "T", "U": "T",
    "R": "AG", "Y": "CT", "S": "CG", "W": "AT", "K": "GT", "M": "AC",
    "B": "CGT", "D": "AGT", "H": "ACT", "V": "ACG",
    "N": "ACGT",
}
_COMPLEMENT = str.maketrans("ACGTURYSWKMBDHVN", "TGCAAYRSWMKVHDBN")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".fa.gz", ".fasta.gz", ".fna.gz")


def _table() -> np.ndarray:
    table = np.full((256, 4), np.nan, dtype=np.float32)
    for code, bases in IUPAC.items():
        row = np.zeros(4, dtype=np.float32)
        for b in bases:
            row[BASES.index(b)] = 1.0 / len(bases)
        table[ord(code)] = row
        table[ord(code.lower())] = row
    return table


_TABLE = _table()


@dataclass
class Record:
    """One named sequence (upper case, validated)."""

    id: str
    sequence: str


def clean(sequence: str, seq_id: str = "sequence") -> str:
    """Strip surrounding white space, upper-case, and check every character is IUPAC DNA.

    Raises:
        DataError: empty sequence, or characters outside the IUPAC nucleotide codes (named,
            with the first position, 1-based).
    """
    if not isinstance(sequence, str):
        raise DataError(f"sequence must be text, got {type(sequence).__name__}", sample_id=seq_id)
    seq = sequence.strip().upper()
    if not seq:
        raise DataError("empty sequence", sample_id=seq_id, hint="give at least one base")
    bad = sorted({c for c in seq if c not in IUPAC})
    if bad:
        first = next(i for i, c in enumerate(seq) if c not in IUPAC) + 1
        shown = ", ".join(repr(c) for c in bad[:8])
        raise DataError(
            f"sequence '{seq_id}' contains characters outside the IUPAC nucleotide codes: "
            f"{shown} (first at position {first})",
            sample_id=seq_id,
            hint="use A, C, G, T/U and the ambiguity codes R Y S W K M B D H V N",
        )
    return seq


def encode(sequence: str, seq_id: str = "sequence") -> np.ndarray:
    """IUPAC DNA → fractional one-hot array of shape (4, L), float32 (channels A, C, G, T)."""
    seq = clean(sequence, seq_id)
    codes = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
    return np.ascontiguousarray(_TABLE[codes].T)


def reverse_complement(sequence: str) -> str:
    """Reverse complement of an (upper-case IUPAC) sequence; ambiguity codes complemented."""
    return sequence.upper().translate(_COMPLEMENT)[::-1]


def is_fasta_path(name: str) -> bool:
    return name.lower().endswith(FASTA_SUFFIXES)


def parse_fasta(text: str, source: str = "FASTA") -> list[Record]:
    """Records of FASTA text (``>id description`` then sequence lines; ``;`` comments skipped).

    Raises:
        DataError: no records, sequence lines before the first header, or an empty record.
    """
    records: list[Record] = []
    name: str | None = None
    chunks: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if name is not None:
                records.append(_record(name, chunks, source))
            name = line[1:].split()[0] if line[1:].strip() else f"record{len(records) + 1}"
            chunks = []
        elif name is None:
            raise DataError(f"{source} has sequence data before the first '>' header",
                            path=source, hint=f"line {lineno}: add a '>name' line first")
        else:
            chunks.append(line)
    if name is not None:
        records.append(_record(name, chunks, source))
    if not records:
        raise DataError(f"{source} contains no sequences", path=source,
                        hint="a FASTA file has '>name' header lines followed by the sequence")
    return records


def _record(name: str, chunks: list[str], source: str) -> Record:
    if not chunks:
        raise DataError(f"FASTA record '{name}' has no sequence", path=source, sample_id=name)
    return Record(id=name, sequence=clean("".join(chunks), name))


def read_fasta(path: str | Path) -> list[Record]:
    """Read a (optionally gzipped) FASTA file.

    Raises:
        DataError: missing, unreadable or empty file; invalid characters (naming the record).
    """
    p = Path(path)
    try:
        found = p.is_file()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        raise DataError(f"not a usable file path: {type(e).__name__}", path=str(p)[:120]) from e
    if not found:
        raise DataError("FASTA file not found", path=str(p))
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read FASTA file: {e}", path=str(p)) from e
    return parse_fasta(text, source=str(p))
