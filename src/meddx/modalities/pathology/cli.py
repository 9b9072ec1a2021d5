"""``meddx wsi``: look at a whole-slide image and cut it into tiles."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

__all__ = ["register"]

wsi_app = typer.Typer(help="Whole-slide images: metadata, tissue mask and tiles.",
                      no_args_is_help=True)

_SLIDE_MPP_HELP = ("The slide's own µm per pixel at level 0, for files that do not say it "
                   "(0.25 for a 40x scan, 0.5 for 20x).")


@wsi_app.command("info")
def info(
    slide: Path = typer.Argument(..., help="A slide file (.svs, .tif, .ndpi, .mrxs …) or a "
                                 "DICOM WSI folder."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=_SLIDE_MPP_HELP),
) -> None:
    """Print the slide's levels, resolution and associated image names (never their pixels).

    Example: ``meddx wsi info CMU-1-Small-Region.svs``
    """
    from meddx.modalities.pathology.slide import open_slide

    with open_slide(slide, mpp=slide_mpp) as s:
        out = {"file": s.path.name, "backend": s.backend, "mpp": s.mpp,
               "dimensions": list(s.dimensions),
               "levels": [{"dimensions": list(d), "downsample": round(ds, 3)}
                          for d, ds in zip(s.level_dimensions, s.level_downsamples, strict=True)],
               "associated_images": s.associated_names,
               "note": "associated images (label, macro) may carry identifiers: meddx never "
                       "exports or serves them"}
    typer.echo(json.dumps(out, indent=2))


@wsi_app.command("tiles")
def tiles(
    slide: Path = typer.Argument(..., help="A slide file or a DICOM WSI folder."),
    out: Path = typer.Option(..., "--out", help="Folder for tiles.csv (+ .json), "
                             "thumbnail.png (tissue mask and kept tiles drawn) and summary.json."),
    mpp: float = typer.Option(0.5, "--mpp", help="µm per pixel of the tiles (0.5 ≈ 20x)."),
    size: int = typer.Option(224, "--size", help="Tile side in pixels at --mpp."),
    overlap: int = typer.Option(0, "--overlap", help="Pixels shared by neighbouring tiles."),
    min_tissue: float = typer.Option(0.5, "--min-tissue",
                                     help="Keep tiles with at least this tissue fraction."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=_SLIDE_MPP_HELP),
    png: bool = typer.Option(False, "--png", help="Also write every kept tile as "
                             "tiles/x<X>_y<Y>.png (level-0 coordinates)."),
    thumbnail_side: int = typer.Option(1024, "--thumbnail-side",
                                       help="Longer side of thumbnail.png in pixels."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Find tissue and cut the slide into tiles at a given resolution, streaming (memory
    holds a batch of tiles, never a level). Coordinates are level-0 pixels.

    Example: ``meddx wsi tiles CMU-1-Small-Region.svs --mpp 0.5 --size 224 --out tiles/``
    """
    from PIL import Image

    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index, tissue_mask

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(slide, mpp=slide_mpp) as s:
        mask = tissue_mask(s)
        index = tile_index(s, mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue,
                           mask=mask)
        index.save(out / "tiles.csv")
        thumb = s.thumbnail(thumbnail_side)
        Image.fromarray(draw_tiles(thumb, mask[0], index)).save(out / "thumbnail.png")
        read_s, n = 0.0, len(index)
        if png:
            folder = out / "tiles"
            folder.mkdir(exist_ok=True)
            from tqdm import tqdm

            t0 = time.perf_counter()
            with tqdm(total=n, unit="tile", disable=not progress) as bar:
                for xy, batch in iter_tiles(s, index, batch_size=32):
                    for (x, y), tile in zip(xy, batch, strict=True):
                        Image.fromarray(tile).save(folder / f"x{x}_y{y}.png")
                    bar.update(len(batch))
            read_s = time.perf_counter() - t0
        summary = {"slide": s.path.name, "backend": s.backend, "slide_mpp": s.mpp,
                   "dimensions": list(s.dimensions), "tile_mpp": mpp, "tile_size": size,
                   "overlap": overlap, "min_tissue": min_tissue, "tiles": n,
                   "tiles_considered": index.info["tiles_considered"],
                   "tissue_fraction": index.info["tissue_fraction"],
                   "tiles_per_s": round(n / read_s, 1) if read_s else None,
                   "wall_s": round(time.perf_counter() - start, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rate = f", {summary['tiles_per_s']} tiles/s written" if read_s else ""
    typer.echo(f"{n} tiles of {size} px at {mpp:g} µm/px ({summary['tissue_fraction']:.0%} of "
               f"the slide is tissue){rate} → {out}")


def draw_tiles(thumb: np.ndarray, mask: np.ndarray, index: object) -> np.ndarray:
    """The thumbnail with the tissue mask tinted green and the kept tiles outlined."""
    from PIL import Image, ImageDraw

    h, w = thumb.shape[:2]
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST))
    img = thumb.astype(np.float32)
    tint = np.array([40, 200, 90], np.float32)
    img[m > 0] = 0.7 * img[m > 0] + 0.3 * tint
    im = Image.fromarray(img.round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    sw0, sh0 = index.slide_dimensions  # type: ignore[attr-defined]
    sx, sy = w / sw0, h / sh0
    side = index.level0_size  # type: ignore[attr-defined]
    for x, y in index.coords:  # type: ignore[attr-defined]
        draw.rectangle([x * sx, y * sy, (x + side) * sx - 1, (y + side) * sy - 1],
                       outline=(20, 60, 200))
    return np.asarray(im)


def register(app: typer.Typer) -> None:
    """Add ``meddx wsi …`` to the CLI."""
    app.add_typer(wsi_app, name="wsi")
