"""A slide package carries its tile encoder.

A slide model (ABMIL over tile embeddings) is only half a model without the tile encoder that
made its embeddings. When the encoder is a trained tile-classifier package, packaging copies it
into the slide package as a sub-folder::

    model/                       the slide package
      weights.safetensors        ABMIL
      card.json                  preprocessing.encoder = {"kind": "package", "path": "encoder",
                                 "bundled": true, "sha256": <encoder weights>, "dim": D}
      manifest.json              lists encoder/card.json, encoder/weights.safetensors,
                                 encoder/manifest.json too: signing and loading cover them
      encoder/
        weights.safetensors      the encoder's weights, byte for byte (safetensors, no pickle)
        card.json                the encoder card's fields that rebuild and identify it
        manifest.json            sha256 of the two

so the slide package is one unit to copy, sign and serve. Loading points the encoder at the
package's own folder; the encoder's identity (``package:<weights sha256>``), and with it the
bag cache key, is the same wherever the package lies.

Packages made before this refer to the encoder package by an absolute path and its sha256;
they still load, and predict while that path holds the same encoder. ``meddx wsi
embed-encoder MODEL [--encoder FOLDER]`` (or any rewrite of the package's card) copies it in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, ModelError

__all__ = ["ENCODER_DIR", "REPACKAGE_HINT", "bundle_encoder", "embed_encoder", "resolve_encoder"]

logger = logging.getLogger(__name__)

ENCODER_DIR = "encoder"
_FILES = ("card.json", "weights.safetensors")
_MANIFEST = "manifest.json"
# what rebuilds the encoder (modality, task, network, preprocessing) and says what it is
_CARD_FIELDS = ("schema_version", "name", "version", "created", "meddx_version", "modality",
                "task", "network", "preprocessing", "training_data", "training", "metrics",
                "license", "intended_use", "research_only")
REPACKAGE_HINT = ("copy the encoder into the slide package: `meddx wsi embed-encoder MODEL "
                  "--encoder ENCODER_PACKAGE` (the tile-classifier package the slide model was "
                  "trained with)")


def _package_ref(enc: Any) -> bool:
    return isinstance(enc, dict) and enc.get("kind") == "package" and bool(enc.get("path"))


def _source(enc: dict[str, Any], root: Path) -> Path:
    path = Path(str(enc["path"]))
    if enc.get("bundled") and not path.is_absolute():
        path = root / path
    if not (path / _MANIFEST).is_file():
        raise ModelError(f"the tile encoder package of this slide model is not at {path}",
                         path=str(path), hint=REPACKAGE_HINT)
    return path


def _read_verified(source: Path, digest: str | None) -> dict[str, bytes]:
    """The encoder's card and weights, each checked against its own manifest (and the weights
    against ``digest``, the encoder the slide model was trained with)."""
    try:
        manifest = json.loads((source / _MANIFEST).read_text())
        blobs = {name: (source / name).read_bytes() for name in _FILES}
    except (OSError, ValueError) as e:
        raise ModelError(f"the tile encoder package cannot be read ({e})", path=str(source),
                         hint=REPACKAGE_HINT) from e
    for name, blob in blobs.items():
        if manifest.get(name) != hashlib.sha256(blob).hexdigest():
            raise ModelError(f"tile encoder file {name} was changed or is not listed "
                             "(sha256 mismatch)", path=str(source / name),
                             hint="restore the encoder package it was trained with")
    weights = manifest["weights.safetensors"]
    if digest and weights != digest:
        raise ModelError("the tile encoder package differs from the one this slide model was "
                         "trained with (sha256 mismatch)", path=str(source), hint=REPACKAGE_HINT)
    return blobs


def _card_subset(raw: bytes) -> bytes:
    card = json.loads(raw)
    return json.dumps({k: card[k] for k in _CARD_FIELDS if k in card}, indent=2).encode()


def _copy(blobs: dict[str, bytes], target: Path) -> None:
    """Write the encoder folder next to ``target`` under a hidden name, then swap it in (a
    hidden folder is never listed in the slide package's manifest)."""
    from meddx.signing import write_manifest

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {"card.json": _card_subset(blobs["card.json"]),
             "weights.safetensors": blobs["weights.safetensors"]}
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
    write_manifest(tmp)  # the encoder stays a package of its own: its manifest, the same way
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def bundle_encoder(input_spec: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """Copy a package tile encoder into the slide package at ``root`` (``root/encoder``) and
    return the preprocessing that names it there; other encoders pass unchanged.

    Raises:
        ModelError: the encoder package is missing, changed, or not the one the model was
            trained with (its weights' sha256).
    """
    enc = input_spec.get("encoder")
    if not _package_ref(enc):
        return input_spec
    root = Path(root)
    target = root / ENCODER_DIR
    source = _source(enc, root)
    blobs = _read_verified(source, enc.get("sha256"))
    if source.resolve() != target.resolve():
        _copy(blobs, target)
        logger.info("tile encoder copied into the slide package (%s)", target)
    name = json.loads(blobs["card.json"]).get("name")
    stored = {k: v for k, v in enc.items() if k not in ("path", "bundled", "name")}
    stored.update(kind="package", path=ENCODER_DIR, bundled=True,
                  sha256=hashlib.sha256(blobs["weights.safetensors"]).hexdigest(), name=name)
    return {**input_spec, "encoder": stored}


def resolve_encoder(input_spec: dict[str, Any], root: str | Path,
                    manifest: dict[str, str]) -> dict[str, Any]:
    """The preprocessing of a slide package loaded from ``root`` with its bundled encoder
    pointed at ``root/encoder`` (an absolute path, for readers in any working folder).

    Raises:
        ModelError: the card says the encoder is bundled but the manifest does not cover its
            files (so neither loading nor a signature would have checked them).
    """
    enc = input_spec.get("encoder")
    if not _package_ref(enc):
        return input_spec
    if not enc.get("bundled"):
        if not (Path(str(enc["path"])) / _MANIFEST).is_file():
            logger.warning("this slide model refers to its tile encoder by path, and it is "
                           "not there: %s", REPACKAGE_HINT)
        return input_spec
    unlisted = [f"{ENCODER_DIR}/{n}" for n in (*_FILES, _MANIFEST)
                if f"{ENCODER_DIR}/{n}" not in manifest]
    if unlisted:
        raise ModelError(f"the package's manifest does not list its tile encoder's files "
                         f"({', '.join(unlisted)})", path=str(root),
                         hint="rebuild the package (`meddx wsi embed-encoder MODEL`) and re-sign it")
    return {**input_spec, "encoder": {**enc, "path": str((Path(root) / ENCODER_DIR).resolve())}}


def embed_encoder(model: str | Path, encoder: str | Path | None = None) -> dict[str, Any]:
    """Copy the tile encoder into a slide package that refers to it by path (one made before
    slide packages carried their encoder), then rewrite its card and manifest.

    Args:
        model: the slide package folder (checked against its manifest first).
        encoder: where the encoder package is now; None: the path the card names.

    Returns:
        ``{"encoder", "sha256", "signature_removed"}``: a signature made before no longer
        matches the manifest, so it is removed (sign the package again).

    Raises:
        ConfigError: the model has no encoder package to carry.
        ModelError: the package does not match its manifest, or the encoder is missing or is
            not the one the model was trained with (sha256).
    """
    from meddx.signing import SIGNATURE, check_package_files, write_manifest

    root = Path(model)
    check_package_files(root)
    card = json.loads((root / "card.json").read_text())
    spec = card.get("preprocessing") or {}
    enc = spec.get("encoder")
    if not _package_ref(enc):
        raise ConfigError(f"this model has no tile-encoder package to carry (encoder {enc!r})",
                          path=str(root), hint="only slide models over a trained tile "
                          "classifier refer to an encoder package")
    if encoder is not None:
        enc = {**enc, "path": str(Path(encoder).resolve()), "bundled": False}
    card["preprocessing"] = bundle_encoder({**spec, "encoder": enc}, root)
    (root / "card.json").write_text(json.dumps(card, indent=2))
    write_manifest(root)
    signed = (root / SIGNATURE).is_file()
    if signed:
        (root / SIGNATURE).unlink()
    stored = card["preprocessing"]["encoder"]
    return {"encoder": stored.get("name"), "sha256": stored["sha256"],
            "signature_removed": signed}
