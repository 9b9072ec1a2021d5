"""Whole-slide tiling: tile count, tiles/s and peak memory as the slide grows; the inference path
against naive PIL crops of the full level; Macenko against re-stained copies.

Run: ``nice -n 10 .venv/bin/python benchmarks/wsi.py`` (needs the bundled
``pathology/CMU-1-Small-Region.svs``; writes synthetic 4x and 16x slides under
``~/.cache/meddx/bench``). Writes ``benchmarks/results/wsi.json`` and ``.md``. Not a test.

Every memory figure is the peak resident set (``VmHWM``) of a fresh subprocess that does one
thing, next to its resident set after imports, so the growth is what the work itself costs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write  # noqa: E402

from meddx.catalog import cache_dir, data_roots  # noqa: E402

SLIDE = "pathology/CMU-1-Small-Region.svs"
MPP, SIZE, MIN_TISSUE = 0.5, 224, 0.5


def _vm(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bundled() -> Path:
    for root in data_roots():
        if (root / SLIDE).exists():
            return root / SLIDE
    raise SystemExit(f"{SLIDE} not found; set MEDDX_DATA")


# ---------------------------------------------------------------- synthetic larger slides


def mirrored_slide(base: np.ndarray, k: int, path: Path) -> Path:
    """A k x k mirror tiling of ``base`` (seamless) as a JPEG pyramidal TIFF (levels 1, 4, 16,
    like an Aperio scan), written tile by tile: the k*k level is never held in memory."""
    import tifffile
    from PIL import Image

    if path.exists():
        return path
    h, w = base.shape[:2]

    def level_tiles(src: np.ndarray, tile: int = 256):
        sh, sw = src.shape[:2]
        H, W = sh * k, sw * k
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                out = np.full((tile, tile, 3), 255, np.uint8)
                for yy in range(y, min(y + tile, H)):
                    i, r = divmod(yy, sh)
                    row = src[r if i % 2 == 0 else sh - 1 - r]
                    cols = np.arange(x, min(x + tile, W))
                    j, c = np.divmod(cols, sw)
                    c = np.where(j % 2 == 0, c, sw - 1 - c)
                    out[yy - y, : len(cols)] = row[c]
                yield out

    levels = [base]
    for ds in (4, 16):
        levels.append(np.asarray(Image.fromarray(base).resize((w // ds, h // ds),
                                                              Image.Resampling.BOX)))
    ppcm = 1e4 / 0.499
    tmp = path.with_suffix(".part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, lvl in enumerate(levels):
            ds = w / lvl.shape[1]
            tif.write(level_tiles(lvl), shape=(lvl.shape[0] * k, lvl.shape[1] * k, 3),
                      dtype=np.uint8, tile=(256, 256), photometric="rgb", compression="jpeg",
                      compressionargs={"level": 90}, resolution=(ppcm / ds, ppcm / ds),
                      resolutionunit="CENTIMETER", subfiletype=1 if i else 0)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- measured in subprocesses


def child_tiles(path: str) -> dict:
    """Open, mask, index, then read every tile (streaming): counts, tiles/s, memory."""
    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index, tissue_mask

    rss0 = _vm("VmRSS")
    t0 = time.perf_counter()
    with open_slide(path) as s:
        mask, ds = tissue_mask(s)
        index = tile_index(s, mpp=MPP, size=SIZE, min_tissue=MIN_TISSUE, mask=(mask, ds))
        t_index = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = sum(len(c) for c, _ in iter_tiles(s, index, batch_size=32))
        t_read = time.perf_counter() - t1
        dims, levels = s.dimensions, len(s.level_dimensions)
    return {"dimensions": list(dims), "levels": levels, "tissue_fraction": float(mask.mean()),
            "tiles": n, "mask_and_index_s": t_index, "read_s": t_read,
            "tiles_per_s": n / t_read if t_read else None, "rss_after_imports_mb": rss0,
            "peak_rss_mb": _vm("VmHWM")}


def child_cli(path: str, out: str) -> dict:
    """``meddx wsi tiles`` as a user runs it (index + thumbnail), in this process."""
    from meddx.cli import app

    rss0 = _vm("VmRSS")
    t0 = time.perf_counter()
    app(["wsi", "tiles", path, "--mpp", str(MPP), "--size", str(SIZE), "--out", out],
        standalone_mode=False)
    return {"wall_s": time.perf_counter() - t0, "rss_after_imports_mb": rss0,
            "peak_rss_mb": _vm("VmHWM")}


def _network():
    import torch

    from meddx.models import build_network

    torch.manual_seed(0)
    net = build_network("resnet18", num_outputs=9,
                        spec={"spatial_dims": 2, "in_channels": 3, "size": SIZE}).eval()
    return net


def _to_tensor(tiles: np.ndarray):
    import torch

    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - 0.5) / 0.25


def _normalizer(path: str):
    """Macenko fitted on a mosaic of the slide's first 16 tissue tiles (not timed)."""
    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.stain import MacenkoNormalizer
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index

    with open_slide(path) as s:
        index = tile_index(s, mpp=MPP, size=SIZE, min_tissue=0.9)
        tiles = next(iter_tiles(s, index, batch_size=16))[1]
    return MacenkoNormalizer().fit(tiles), index


def run_meddx(path: str, index, net, norm, batch: int = 32) -> int:
    """Open the slide, stream the (precomputed, as for the naive path) index's tiles."""
    import torch

    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import iter_tiles

    n = 0
    with open_slide(path) as s, torch.inference_mode():
        for _, tiles in iter_tiles(s, index, batch_size=batch):
            net(_to_tensor(norm.transform(tiles)))
            n += len(tiles)
    return n


def run_naive(path: str, coords: np.ndarray, net, norm, batch: int = 32) -> int:
    """What one writes without a slide reader: load the full level with PIL, crop tiles."""
    import torch
    from PIL import Image

    level = Image.open(path)
    level.load()
    n = 0
    with torch.inference_mode():
        for start in range(0, len(coords), batch):
            tiles = np.stack([np.asarray(level.crop((x, y, x + SIZE, y + SIZE)).convert("RGB"))
                              for x, y in coords[start:start + batch].tolist()])
            net(_to_tensor(norm.transform(tiles)))
            n += len(tiles)
    return n


def child_inference(path: str, reps: int = 3) -> dict:
    """Tiles/s of read + Macenko + ResNet-18 on 2 threads, meddx against naive PIL crops,
    interleaved in one process (the machine is shared: alternating evens out its load)."""
    import torch

    torch.set_num_threads(2)
    net = _network()
    norm, _ = _normalizer(path)
    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import tile_index

    with open_slide(path) as s:
        index = tile_index(s, mpp=MPP, size=SIZE, min_tissue=MIN_TISSUE)
    coords = index.coords
    run_meddx(path, index, net, norm)  # warm-up (allocator, kernels)
    rates: dict[str, list[float]] = {"meddx": [], "naive": []}
    for _ in range(reps):
        for name in ("meddx", "naive"):
            t0 = time.perf_counter()
            n = (run_meddx(path, index, net, norm) if name == "meddx"
                 else run_naive(path, coords, net, norm))
            rates[name].append(n / (time.perf_counter() - t0))
    # the reading alone, same tiles
    from meddx.modalities.pathology.tiling import iter_tiles

    read: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_slide(path) as s:
        n = sum(len(c) for c, _ in iter_tiles(s, index))
    read["meddx"] = n / (time.perf_counter() - t0)
    from PIL import Image

    t0 = time.perf_counter()
    level = Image.open(path)
    level.load()
    _ = [np.asarray(level.crop((x, y, x + SIZE, y + SIZE))) for x, y in coords.tolist()]
    read["naive"] = len(coords) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(3):
        norm.transform(_to_uint8_tiles(path, coords[:32]))
    macenko_ms = (time.perf_counter() - t0) / (3 * min(32, len(coords))) * 1e3
    return {"tiles": int(len(coords)), "threads": torch.get_num_threads(), "rates": rates,
            "read_only_tiles_per_s": read, "macenko_ms_per_tile": macenko_ms}


def _to_uint8_tiles(path: str, coords: np.ndarray) -> np.ndarray:
    from meddx.modalities.pathology.slide import open_slide

    with open_slide(path) as s:
        return np.stack([s.read_at_mpp((x, y), MPP, SIZE) for x, y in coords.tolist()])


def child_memory(path: str, how: str) -> dict:
    """Peak RSS of the inference path, one way, in a process of its own."""
    import torch

    torch.set_num_threads(2)
    net = _network()
    norm, _ = _normalizer(path)
    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import tile_index

    with open_slide(path) as s:
        index = tile_index(s, mpp=MPP, size=SIZE, min_tissue=MIN_TISSUE)
    rss0 = _vm("VmRSS")
    t0 = time.perf_counter()
    n = (run_meddx(path, index, net, norm) if how == "meddx"
         else run_naive(path, index.coords, net, norm))
    return {"tiles": n, "tiles_per_s": n / (time.perf_counter() - t0),
            "rss_before_mb": rss0, "peak_rss_mb": _vm("VmHWM")}


def child_stain(path: str) -> dict:
    """Re-stained copies (strong HED jitter, sigma 0.2, a stand-in for another lab's staining)
    of the slide's tissue tiles: colour distance (CIEDE2000) to the original tile before and
    after Macenko normalisation of both, and between different tiles (content kept?)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.stain import MacenkoNormalizer, hed_jitter
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index

    with open_slide(path) as s:
        index = tile_index(s, mpp=MPP, size=SIZE, min_tissue=MIN_TISSUE)
        tiles = np.concatenate([t for _, t in iter_tiles(s, index)])
    norm = MacenkoNormalizer().fit(tiles[:16])
    rng = np.random.default_rng(0)
    copies = hed_jitter(tiles, sigma=0.2, rng=rng)
    lab = lambda x: rgb2lab(x)  # noqa: E731

    def de(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean([deltaE_ciede2000(lab(x), lab(y)).mean() for x, y in zip(a, b,
                                                                                      strict=True)]))

    n_tiles = norm.transform(tiles)
    n_copies = norm.transform(copies)
    shifted = np.roll(np.arange(len(tiles)), 1)
    light = hed_jitter(tiles, sigma=0.05, rng=1)
    return {
        "tiles": int(len(tiles)),
        "deltaE_copy_vs_original_raw": de(copies, tiles),
        "deltaE_copy_vs_original_macenko": de(n_copies, n_tiles),
        "deltaE_light_jitter_vs_original_raw": de(light, tiles),
        "deltaE_between_tiles_raw": de(tiles, tiles[shifted]),
        "deltaE_between_tiles_macenko": de(n_tiles, n_tiles[shifted]),
    }


# ---------------------------------------------------------------- orchestration


def sub(kind: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import tempfile

    env = environment()
    env["threads"] = 2
    real = bundled()
    from PIL import Image

    base = np.asarray(Image.open(real).convert("RGB"))
    folder = cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    slides = {"CMU-1-Small-Region (real, 1 level)": real,
              "4x (2x2 mirrored, pyramidal)": mirrored_slide(base, 2, folder / "wsi_cmu1_4x.tif"),
              "16x (4x4 mirrored, pyramidal)": mirrored_slide(base, 4,
                                                              folder / "wsi_cmu1_16x.tif")}
    del base
    scaling = {}
    for name, path in slides.items():
        with tempfile.TemporaryDirectory() as tmp:
            cli = sub("cli", str(path), tmp)
        tiles = sub("tiles", str(path))
        scaling[name] = {"path": str(path), "level0_mpix": tiles["dimensions"][0]
                         * tiles["dimensions"][1] / 1e6, "cli": cli, "stream": tiles}
        print(name, json.dumps(scaling[name]), flush=True)
    inference = sub("inference", str(real))
    memory = {how: sub("memory", str(real), how) for how in ("meddx", "naive")}
    stain = sub("stain", str(real))
    data = {"environment": env, "settings": {"mpp": MPP, "size": SIZE, "min_tissue": MIN_TISSUE},
            "scaling": scaling, "inference": inference, "inference_memory": memory,
            "stain": stain}
    write("wsi", data, markdown(data))


def markdown(d: dict) -> str:
    env, inf = d["environment"], d["inference"]
    med = {k: float(np.median(v)) for k, v in inf["rates"].items()}
    lines = [
        "# Whole-slide tiling (`benchmarks/wsi.py`)",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores, shared; load average {env['load_avg']:.1f} "
        f"at start), torch {env['torch']}, commit {env['commit']}, {env['date']}. Tiles "
        f"{d['settings']['size']} px at {d['settings']['mpp']} µm/px, min tissue "
        f"{d['settings']['min_tissue']}. Memory: peak RSS (VmHWM) of a fresh process doing one "
        "thing; 'after imports' is its RSS before the work.",
        "",
        "## Tiling as the slide grows",
        "",
        "| slide | level 0 (Mpx) | levels | tissue | tiles | `meddx wsi tiles` s | peak RSS "
        "(after imports) MB | streaming read tiles/s | peak RSS (after imports) MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in d["scaling"].items():
        c, s = r["cli"], r["stream"]
        lines.append(f"| {name} | {r['level0_mpix']:.1f} | {s['levels']} | "
                     f"{s['tissue_fraction']:.1%} | {s['tiles']} | {c['wall_s']:.1f} | "
                     f"{c['peak_rss_mb']:.0f} ({c['rss_after_imports_mb']:.0f}) | "
                     f"{s['tiles_per_s']:.0f} | {s['peak_rss_mb']:.0f} "
                     f"({s['rss_after_imports_mb']:.0f}) |")
    m = d["inference_memory"]
    st = d["stain"]
    lines += [
        "",
        "## Inference path on 2 threads (read + Macenko + ResNet-18, untrained, batch 32)",
        "",
        f"{inf['tiles']} tissue tiles of the real slide, 3 interleaved runs each in one process "
        "(median); both paths get the same precomputed tile coordinates. meddx opens the slide and "
        "streams them (`iter_tiles`); naive: `PIL.Image.open(svs)` loads the full level 0 and "
        "tiles are `crop`s. The same Macenko and network follow.",
        "",
        "| path | tiles/s (median of 3) | runs | read only, tiles/s | peak RSS, own process MB "
        "(before the run) |",
        "|---|---:|---|---:|---:|",
        f"| meddx (`iter_tiles`) | {med['meddx']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in inf['rates']['meddx'])} | "
        f"{inf['read_only_tiles_per_s']['meddx']:.0f} | {m['meddx']['peak_rss_mb']:.0f} "
        f"({m['meddx']['rss_before_mb']:.0f}) |",
        f"| naive PIL crops | {med['naive']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in inf['rates']['naive'])} | "
        f"{inf['read_only_tiles_per_s']['naive']:.0f} | {m['naive']['peak_rss_mb']:.0f} "
        f"({m['naive']['rss_before_mb']:.0f}) |",
        "",
        f"Ratio meddx / naive: **{med['meddx'] / med['naive']:.2f}** (whole path), "
        f"{inf['read_only_tiles_per_s']['meddx'] / inf['read_only_tiles_per_s']['naive']:.2f} "
        f"(reading alone). Macenko costs {inf['macenko_ms_per_tile']:.1f} ms a tile.",
        "",
        "## Stain: Macenko against re-stained copies",
        "",
        f"{st['tiles']} tissue tiles; each re-stained by strong HED jitter (sigma 0.2, seed 0). "
        "Mean CIEDE2000 colour difference per pixel:",
        "",
        "| pair | raw | both Macenko-normalised |",
        "|---|---:|---:|",
        f"| re-stained copy vs its original | {st['deltaE_copy_vs_original_raw']:.2f} | "
        f"{st['deltaE_copy_vs_original_macenko']:.2f} |",
        f"| neighbouring different tiles (content) | {st['deltaE_between_tiles_raw']:.2f} | "
        f"{st['deltaE_between_tiles_macenko']:.2f} |",
        f"| light jitter (sigma 0.05) vs original | "
        f"{st['deltaE_light_jitter_vs_original_raw']:.2f} | |",
        "",
        "Reproduce: `MEDDX_DATA=/path/to/shared/data nice -n 10 .venv/bin/python "
        "benchmarks/wsi.py`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        fn = {"tiles": child_tiles, "cli": child_cli, "inference": child_inference,
              "memory": child_memory, "stain": child_stain}[kind]
        result = fn(*args)
        print(json.dumps(result))
    else:
        main()
