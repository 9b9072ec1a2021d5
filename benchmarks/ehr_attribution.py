"""How many integrated-gradients steps the ICU risk drivers need: accuracy against cost.

The CDS card names the variables that push a patient's risk most (``EHRExplainer``:
integrated gradients per variable, captum's Gauss-Legendre rule). Each step is one more
forward and backward pass of the network, paid on every explained call. For a package and the
first ``--stays`` test stays this reports, for each step count, against a reference with
``--reference`` steps:

* the relative L1 error of the per-variable attributions (mean and worst stay);
* how often the named top-4 drivers are the same, in the same order, and as a set;
* CPU ms per explanation (one thread, median of the stays).

Usage::

    python benchmarks/ehr_attribution.py [--package runs/bench_icu/grud/model]
        [--stays 60] [--steps 4 8 16 32] [--reference 128]

Writes ``benchmarks/results/ehr_attribution.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import environment, write

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default=str(ROOT / "runs" / "bench_icu" / "grud" / "model"))
    parser.add_argument("--stays", type=int, default=60)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--reference", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from meddx.inference import Predictor
    from meddx.modalities.ehr.explain import EHRExplainer
    from meddx.package import load_package
    from meddx.training import load_bundle

    package = load_package(args.package)
    net = Predictor(package, backend="torch", bf16=False).model.eval()
    spec = package.card.preprocessing
    bundle = load_bundle(ROOT / "configs" / "physionet2012.yaml")
    stays = [torch.from_numpy(np.ascontiguousarray(x))
             for x in bundle.splits["test"].inputs[: args.stays]]
    ref = EHRExplainer(net, spec, n_steps=args.reference)
    reference = [ref.per_variable(ref.attributions(x)) for x in stays]

    def top(per: dict[str, float]) -> list[str]:
        return sorted(per, key=lambda k: -abs(per[k]))[:4]

    rows = []
    for steps in args.steps:
        explainer = EHRExplainer(net, spec, n_steps=steps)
        explainer.attributions(stays[0])  # warm-up
        errors, same_order, same_set, ms = [], 0, 0, []
        for x, r in zip(stays, reference, strict=True):
            t = time.process_time()
            a = explainer.per_variable(explainer.attributions(x))
            ms.append((time.process_time() - t) * 1e3)
            truth = np.array(list(r.values()))
            errors.append(float(np.abs(np.array([a[k] for k in r]) - truth).sum()
                                / max(np.abs(truth).sum(), 1e-12)))
            same_order += top(a) == top(r)
            same_set += set(top(a)) == set(top(r))
        rows.append({"steps": steps, "rel_l1_mean": float(np.mean(errors)),
                     "rel_l1_max": float(np.max(errors)),
                     "top4_same_order": same_order / len(stays),
                     "top4_same_set": same_set / len(stays), "cpu_ms_median": float(np.median(ms))})
    net_name = package.card.network.get("name")
    members = package.card.network.get("options", {}).get("members", 1)
    md = ["# ICU risk drivers: integrated-gradients steps against accuracy", "",
          f"Package `{args.package}` ({net_name}, {members} member(s)); the first {len(stays)} "
          f"test stays; reference: {args.reference} steps; one thread.", "",
          "| steps | rel. L1 error, mean | worst stay | top-4 same order | top-4 same set | "
          "CPU ms / explanation |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['steps']} | {r['rel_l1_mean']:.2%} | {r['rel_l1_max']:.2%} | "
                  f"{r['top4_same_order']:.0%} | {r['top4_same_set']:.0%} | "
                  f"{r['cpu_ms_median']:.1f} |")
    md += ["", f"Reproduce: `python benchmarks/ehr_attribution.py --package {args.package}`"]
    write("ehr_attribution", {"package": args.package, "network": net_name, "members": members,
                              "stays": len(stays), "reference_steps": args.reference,
                              "rows": rows, "environment": environment()}, "\n".join(md))


if __name__ == "__main__":
    main()
