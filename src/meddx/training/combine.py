"""Join trained packages into one: a seed ensemble, test-time augmentation, or both.

``meddx ensemble runs/a/model runs/b/model runs/c/model --tta flips --out runs/abc`` builds the
mean-of-logits ensemble of the three networks wrapped in flip TTA (:mod:`meddx.models.combine`),
writes it as one verified package, and refits the post-hoc fits (temperature, operating points,
conformal sets, OOD detector) on the calibration split, because the combined output is a new
model. The same with one package adds (or removes) TTA.

The refit needs a calibration split that no member trained on. Packages trained by ``meddx
train`` record a SHA-256 of each split's ids (``training_data.split_sha256``); members with
different splits (e.g. different seeds where calib is carved from train with the seed) are
refused unless ``post_hoc=False``, which joins them without any post-hoc fit — fine for
measuring discrimination on test, not for deployment. ``model.options.members`` in a config
trains an ensemble whose members share one split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from meddx.errors import ConfigError
from meddx.package import ModelPackage, load_package, save_package

__all__ = ["join_packages"]

logger = logging.getLogger(__name__)

def _plain(package: ModelPackage) -> torch.nn.Module:
    """The package's network without its TTA wrapper."""
    from meddx.models.combine import FlipTTA

    model = package.build_model()
    return model.net if isinstance(model, FlipTTA) else model


def _base_options(package: ModelPackage) -> dict[str, Any]:
    from meddx.models.combine import plain_options

    return plain_options(package.card.network.get("options", {}))


def _stored_preprocessing(package: ModelPackage) -> Any:
    """The preprocessing as the card on disk says it: loading may point parts a package
    carries (a slide model's encoder) at that package's own folder."""
    return json.loads((package.path / "card.json").read_text()).get("preprocessing")


def _check_compatible(packages: list[ModelPackage]) -> None:
    first = packages[0].card
    for p in packages[1:]:
        c = p.card
        for what, a, b in (("modality", first.modality, c.modality),
                           ("task", first.task.model_dump(), c.task.model_dump()),
                           ("network", first.network.get("name"), c.network.get("name")),
                           ("network options", _base_options(packages[0]), _base_options(p)),
                           ("preprocessing", _stored_preprocessing(packages[0]),
                            _stored_preprocessing(p))):
            if a != b:
                raise ConfigError(f"packages {first.name!r} and {c.name!r} differ in {what}",
                                  hint="join packages trained with one recipe")
    if len(packages) > 1:
        nested = [p.card.name for p in packages
                  if int(p.card.network.get("options", {}).get("members", 1) or 1) > 1]
        if nested:
            raise ConfigError(f"{', '.join(nested)} already an ensemble",
                              hint="join single networks, or pass one package to change its TTA")


def _same_splits(packages: list[ModelPackage]) -> bool:
    prints = [p.card.training_data.get("split_sha256") for p in packages]
    if all(prints):
        return all(fp == prints[0] for fp in prints)
    # older packages: the same seed and data section draw the same split
    keys = [(p.card.training.get("config", {}).get("seed"),
             p.card.training.get("config", {}).get("data")) for p in packages]
    return all(k == keys[0] and k[1] is not None for k in keys)


def join_packages(paths: list[str | Path], out: str | Path, *, tta: str | None = None,
                  post_hoc: bool = True, name: str | None = None) -> ModelPackage:
    """One package from ``paths``: their mean-logit ensemble (2+ packages), with ``tta``.

    Args:
        paths: package folders (one, to change only its test-time augmentation).
        out: the new package folder.
        tta: ``none``, ``hflip`` or ``flips`` (None keeps the first package's setting).
        post_hoc: refit temperature, operating points, conformal sets and the OOD detector on
            the calibration split (rebuilt from the first package's training config).
        name: the card's name (default: the first package's, with ``-ensemble``/``-tta``).

    Raises:
        ConfigError: packages of different recipes, members trained on different splits
            (with ``post_hoc``), TTA flips on a model trained without flips, or nothing to do.
    """
    from meddx.modalities import get_modality
    from meddx.models import with_tta
    from meddx.models.combine import Ensemble, describe

    if not paths:
        raise ConfigError("name at least one package to join")
    packages = [load_package(p) for p in paths]
    _check_compatible(packages)
    first = packages[0]
    options = dict(first.card.network.get("options", {}))
    if tta is None:
        tta = options.get("tta") or "none"
    config = first.card.training.get("config") or {}
    flips_trained = (config.get("train", {}).get("augment", {}) or {}).get("flips", True)
    if tta != "none" and not flips_trained:
        raise ConfigError("test-time flips on a model trained without flips",
                          hint="train with train.augment.flips, or use --tta none")
    if len(packages) == 1 and tta == (options.get("tta") or "none"):
        raise ConfigError("nothing to do: one package and the same test-time augmentation",
                          hint="name two or more packages, or change --tta")
    if post_hoc and len(packages) > 1 and not _same_splits(packages):
        raise ConfigError(
            "the members were trained on different splits (different seeds carve different "
            "calibration sets), so no calibration split is unseen by all of them",
            hint="train one ensemble with model.options.members, or join with --no-post-hoc "
                 "(no temperature, operating points or conformal sets: for measuring only)")
    nets = [_plain(p) for p in packages]
    model = Ensemble.from_members(nets) if len(nets) > 1 else nets[0]
    if len(nets) > 1:
        options["members"] = len(nets)
    if tta == "none":
        options.pop("tta", None)
    else:
        options["tta"] = tta
    spec = get_modality(first.card.modality).network_spec(first.card.preprocessing)
    model = with_tta(model, first.card.network["name"], spec, tta)
    suffix = "-ensemble" if len(nets) > 1 else ("-tta" if tta != "none" else "")
    training = dict(first.card.training)
    if len(packages) > 1:
        training["members"] = [{"package_sha256": p.sha256, "name": p.card.name,
                                "seed": p.card.training.get("seed"),
                                "best_score": p.card.training.get("best_score"),
                                "wall_time_s": p.card.training.get("wall_time_s")}
                               for p in packages]
        training["wall_time_s"] = round(sum(p.card.training.get("wall_time_s") or 0
                                            for p in packages), 1)
    training["joined_by"] = "meddx ensemble"
    card = first.card.model_copy(update={
        "name": name or f"{first.card.name}{suffix}",
        "network": {"name": first.card.network["name"], "options": options},
        "training": training, "calibration": None, "operating_points": {},
        "default_operating_point": None, "conformal": None, "ood": None, "reference": None,
        "metrics": {}, "meddx_version": ""})
    package = save_package(out, model.eval(), card)
    logger.info("joined %d package(s) into %s (%s)", len(packages), package.path,
                describe(options))
    if post_hoc:
        _refit(package, first)
    else:
        logger.warning("joined without post-hoc fits: %s has no temperature, operating points "
                       "or conformal sets", package.path)
    return package


def _refit(package: ModelPackage, first: ModelPackage) -> None:
    from meddx.config import ExperimentConfig
    from meddx.modalities.loading import load_bundle
    from meddx.training import split_fingerprints
    from meddx.training.posthoc import fit_post_hoc

    raw = first.card.training.get("config")
    if not raw:
        raise ConfigError(f"{first.path} does not record its training config: cannot rebuild "
                          "its calibration split", hint="join with --no-post-hoc")
    cfg = ExperimentConfig.model_validate(raw)
    bundle = load_bundle(cfg)
    recorded = first.card.training_data.get("split_sha256")
    if recorded and recorded != split_fingerprints(bundle):
        raise ConfigError("the data no longer splits as it did when the members were trained",
                          hint="check the dataset files, or join with --no-post-hoc")
    fit_post_hoc(package, bundle, cfg.evaluation)
