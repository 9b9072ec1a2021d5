"""Training-step throughput: meddx defaults (bf16 autocast + channels_last) vs plain fp32.

Same network (ResNet-18 from the registry), same batch, measured in the same run and
interleaved (A, B, A, B …) so that machine noise hits both. Writes results/throughput.{json,md}.

    python benchmarks/throughput.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import environment, write

from meddx.models import build_network
from meddx.tasks import TaskSpec

CASES = [  # name, spatial_dims, channels, size, batch, steps
    ("2D 28 px", 2, 1, 28, 128, 6),
    ("2D 224 px", 2, 3, 224, 16, 3),
    ("3D 64³", 3, 1, 64, 8, 3),
]
TASK = TaskSpec(kind="binary", class_names=["neg", "pos"], positive_class="pos")


def _setup(dims: int, ch: int, size: int, batch: int, meddx_defaults: bool):
    torch.manual_seed(0)
    model = build_network("resnet18", num_outputs=1,
                          spec={"spatial_dims": dims, "in_channels": ch, "size": size})
    x = torch.rand(batch, ch, *([size] * dims))
    y = torch.randint(0, 2, (batch,))
    if meddx_defaults:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, x, y, opt


def _images_per_s(model, x, y, opt, bf16: bool, steps: int) -> float:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = TASK.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (kernel selection, allocation)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return x.shape[0] * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, dims, ch, size, batch, steps in CASES:
        base = _setup(dims, ch, size, batch, False)
        fast = _setup(dims, ch, size, batch, True)
        fp32, ours = [], []
        for _ in range(args.repeats):
            fp32.append(_images_per_s(*base, bf16=False, steps=steps))
            ours.append(_images_per_s(*fast, bf16=True, steps=steps))
        row = {"case": name, "batch": batch, "fp32_img_s": statistics.median(fp32),
               "meddx_img_s": statistics.median(ours)}
        row["speedup"] = row["meddx_img_s"] / row["fp32_img_s"]
        rows.append(row)
        print(f"{name}: fp32 {row['fp32_img_s']:.1f} img/s, meddx {row['meddx_img_s']:.1f} img/s, "
              f"×{row['speedup']:.2f}", flush=True)
    env = environment()
    md = ["# Training-step throughput (ResNet-18), meddx defaults vs plain fp32", "",
          f"{env['cpu']}, {args.threads} threads, torch {env['torch']}, load average "
          f"{env['load_avg']:.1f} at the end, {env['date']}; median of {args.repeats} interleaved "
          "repeats.", "", "| case | batch | fp32 img/s | meddx (bf16 + channels_last) img/s | speedup |",
          "|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['batch']} | {r['fp32_img_s']:.1f} | {r['meddx_img_s']:.1f} | "
           f"×{r['speedup']:.2f} |" for r in rows]
    write("throughput", {"environment": env, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
