"""``meddx wsi``: whole-slide images on the command line (describe a slide, tile it, stage a
labelled tile set, carry a slide model's tile encoder in its package).

Nothing here writes a slide's associated images (label, macro, scanner thumbnail): they may show
patient identifiers. The thumbnail ``meddx wsi tiles`` writes is drawn from the pyramid itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

__all__ = ["register"]

wsi_app = typer.Typer(help="Whole-slide pathology images: describe and tile slides; carry a "
                      "slide model's tile encoder in its package.",
                      no_args_is_help=True)

_SLIDE_MPP_HELP = ("The slide's own resolution in µm per pixel at level 0, for files that do not "
                   "record it (it overrides the file's value when given).")


@wsi_app.command("info")
def info(
    slide_path: Path = typer.Argument(..., metavar="SLIDE", help="Slide file or DICOM folder."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=_SLIDE_MPP_HELP),
) -> None:
    """Print a slide's backend, levels, resolution and the names of its associated images.

    Example: ``meddx wsi info CMU-1-Small-Region.svs``
    """
    from meddx.modalities.pathology.slide import open_slide

    with open_slide(slide_path, mpp=slide_mpp) as slide:
        typer.echo(f"{slide.path.name}: {slide.backend}, {slide.dimensions[0]}x"
                   f"{slide.dimensions[1]} px at {slide.mpp:.4g} µm/px")
        for i, (dims, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples,
                                           strict=True)):
            typer.echo(f"  level {i}: {dims[0]}x{dims[1]}  downsample {ds:.4g}  "
                       f"{slide.mpp * ds:.4g} µm/px")
        names = ", ".join(slide.associated_names) or "none"
        typer.echo(f"  associated images (never exported): {names}")


def overlay(thumb, mask, coords, level0_size: int, downsample: float):  # noqa: ANN001, ANN201
    """The thumbnail with the tissue outline (green) and kept tiles (blue boxes) drawn on it."""
    import numpy as np
    from PIL import Image, ImageDraw
    from scipy import ndimage

    out = thumb.copy()
    if mask.shape != thumb.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(thumb.shape[1::-1], Image.Resampling.NEAREST))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    out[edge] = (0, 200, 0)
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    side = level0_size / downsample
    for x, y in np.asarray(coords).tolist():
        x0, y0 = x / downsample, y / downsample
        draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), outline=(30, 60, 230))
    return image


@wsi_app.command("tiles")
def tiles(
    slide_path: Path = typer.Argument(..., metavar="SLIDE", help="Slide file or DICOM folder."),
    mpp: float = typer.Option(0.5, "--mpp", help="Resolution of the tiles, µm per pixel."),
    size: int = typer.Option(224, "--size", help="Tile side in pixels at --mpp."),
    overlap: int = typer.Option(0, "--overlap", help="Pixels (at --mpp) shared by neighbours."),
    min_tissue: float = typer.Option(0.5, "--min-tissue",
                                     help="Least tissue fraction of a kept tile (0-1)."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=_SLIDE_MPP_HELP),
    out: Path | None = typer.Option(None, "--out",
                                    help="Output folder [default: ./<slide name>_tiles]."),
    png: bool = typer.Option(False, "--png", help="Also write every tile as a PNG."),
    thumb_side: int = typer.Option(1024, "--thumb-side",
                                   help="Longest side of the thumbnail written."),
    batch_size: int = typer.Option(32, "--batch-size", help="Tiles read at a time (--png)."),
    allow_upsample: bool = typer.Option(
        False, "--allow-upsample", help="Cut tiles more than 2 times finer than the scan "
        "(refused by default: their pixels would be interpolated, not seen)."),
) -> None:
    """Find the tissue on a slide and write its tile index (level-0 x, y and tissue fraction of
    every kept tile), a thumbnail with the mask and tiles drawn, and optionally the tiles.

    Example: ``meddx wsi tiles CMU-1-Small-Region.svs --mpp 0.5 --size 224 --out tiles/cmu1``
    writes ``tiles/cmu1/CMU-1-Small-Region.tiles.csv`` and ``…thumbnail.png``. For a file that
    does not record its resolution add ``--slide-mpp 0.25`` (a TIFF's screen or print default,
    e.g. 72 dpi, counts as none).
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index, tissue_mask

    t0 = time.perf_counter()
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        stem = slide.path.stem if slide.path.is_file() else slide.path.name
        folder = out or Path.cwd() / f"{stem}_tiles"
        mask, mask_ds = tissue_mask(slide)
        index = tile_index(slide, mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue,
                           mask=(mask, mask_ds), allow_upsample=allow_upsample)
        folder.mkdir(parents=True, exist_ok=True)  # after the checks: a refusal writes nothing
        thumb = slide.thumbnail(thumb_side)
        downsample = slide.dimensions[0] / thumb.shape[1]
        index_path = folder / f"{stem}.tiles.csv"
        index.save(index_path)
        thumb_path = folder / f"{stem}.thumbnail.png"
        overlay(thumb, mask, index.coords, index.level0_size, downsample).save(thumb_path)
        read_s = 0.0
        if png and len(index):
            from PIL import Image

            tile_dir = folder / "tiles"
            tile_dir.mkdir(exist_ok=True)
            columns = (TextColumn("tiles"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeRemainingColumn())
            t_read = time.perf_counter()
            with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
                task = progress.add_task("tiles", total=len(index))
                for coords, batch in iter_tiles(slide, index, batch_size=batch_size):
                    for (x, y), tile in zip(coords.tolist(), batch, strict=True):
                        Image.fromarray(tile).save(tile_dir / f"{stem}_x{x}_y{y}.png")
                    progress.advance(task, len(coords))
            read_s = time.perf_counter() - t_read
    wall = time.perf_counter() - t0
    rate = f", {len(index) / read_s:.0f} tiles/s read and written" if read_s > 0 else ""
    typer.echo(f"{len(index)} tiles of {size} px at {mpp:g} µm/px ({index.level0_size} px at "
               f"level 0, overlap {overlap}) on {mask.mean():.1%} tissue of {slide.path.name}; "
               f"index {index_path}, thumbnail {thumb_path}; {wall:.1f} s{rate}")


@wsi_app.command("stage")
def stage(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="The catalog name of a hand-staged set: crchistophenotypes."),
    source: Path = typer.Argument(..., metavar="SNAPSHOT", help="A folder holding the files "
                                  "(e.g. Data/ColonCancer) or the git directory of a snapshot."),
    dest: Path | None = typer.Option(None, "--dest", help="Target folder [default: "
                                     "~/.cache/meddx/data/pathology/<dataset>, where the catalog "
                                     "looks]."),
) -> None:
    """Copy a labelled tile set the catalog cannot download into the data cache, with a label
    table and SHA256SUMS; then check it against the catalog's checksums.

    Example: ``meddx wsi stage crchistophenotypes ./Neural-Trees-for-Multiple-Instance-Learning``
    """
    from meddx.errors import ConfigError
    from meddx.modalities.pathology import tileset

    if dataset.lower() != tileset.NAME:
        raise ConfigError(f"'{dataset}' cannot be staged by hand; known: {tileset.NAME}",
                          hint="run `meddx datasets` for the others (downloadable ones use "
                          "`meddx datasets --download NAME`)")
    root = tileset.stage(source, dest)
    n = tileset.verify(root)
    note = tileset.check_catalog(root)
    typer.echo(f"staged {tileset.NAME} under {root}: {n} files in SHA256SUMS; {note}")


@wsi_app.command("embed-encoder")
def embed_encoder(
    model: Path = typer.Argument(..., help="Slide model package folder."),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="The tile-encoder package the slide model was trained with, "
        "where it is now [default: the path its card names]."),
) -> None:
    """Copy a slide model's tile encoder into its package (packages made before slide packages
    carried their encoder name it by path): the package is then one unit to copy, sign and
    serve. The encoder must be the one the model was trained with (sha256 of its weights).

    Example: ``meddx wsi embed-encoder runs/slides/model --encoder runs/tiles/model``
    """
    from meddx.modalities.pathology.bundle import embed_encoder as embed

    done = embed(model, encoder)
    typer.echo(f"{model}: tile encoder {done['encoder']!r} (sha256 {done['sha256'][:16]}…) "
               "copied into encoder/ and listed in manifest.json")
    if done["signature_removed"]:
        typer.echo("the old signature no longer matched and was removed: sign the package "
                   "again (`meddx sign`)")


def register(app: typer.Typer) -> None:
    """Add ``meddx wsi …`` to the CLI."""
    app.add_typer(wsi_app, name="wsi")
