"""Training: config → data bundle → network → Lightning fit → ModelPackage (+ post-hoc fits).

``train(config, out)`` is the single entry point used by ``meddx train`` and the Python API.
A run folder holds ``config.yaml``, ``splits.json`` (sample ids per split), ``checkpoints/``
(``best.ckpt``, ``last.ckpt`` for ``--resume``), ``logs/`` (CSV metrics) and ``model/``
(the package); an ensemble (``model.options.members``) has one such run per member under
``members/<k>/`` beside its own ``model/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from meddx.config import ExperimentConfig, dump_config
from meddx.errors import ConfigError, EvaluationError
from meddx.modalities import DataBundle, get_modality
from meddx.modalities.loading import as_config, load_bundle
from meddx.package import ModelCard, ModelPackage, save_package

__all__ = ["train", "load_bundle", "as_config", "build_model_for", "Fit", "prepare_fit",
           "package_fit", "trainer_options", "restore_best", "member_config",
           "ensemble_options", "member_bundle", "join_members", "save_splits",
           "train_precision"]

logger = logging.getLogger(__name__)


class _LightningBanner(logging.Filter):
    """Lightning's start-up lines. Its LitLogger advertisement is always dropped; the
    accelerator and precision lines are dropped while ``repeat`` is set (an ensemble's
    members after the first: each member is a run of its own and would print them again)."""

    BANNER = ("GPU available", "TPU available", "Using 16bit", "Using bfloat16")

    def __init__(self) -> None:
        super().__init__()
        self.repeat = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "litlogger" not in msg and not (self.repeat and msg.startswith(self.BANNER))


_BANNER = _LightningBanner()
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_BANNER)


def _cpu_has_bf16() -> bool:
    """Whether PyTorch's oneDNN computes bf16 on this CPU (AVX-512 or AMX); True where the
    check itself is unavailable (the request is then kept)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


_WARNED_PRECISION: set[str] = set()


def train_precision(requested: str, accelerator: str = "cpu") -> str:
    """The precision a run trains at, from ``train.precision``.

    ``bf16-mixed`` is kept where the device computes bf16. A GPU without bf16 gets
    ``16-mixed``. A CPU whose oneDNN has no bf16 kernels (no AVX-512: many AMD EPYC and older
    Xeon machines) trains in fp32: there every bf16 convolution falls back to PyTorch's
    reference path, measured 12-17x slower than fp32 (ResNet-18 at 28 and 64 px on an AVX2-only
    AMD EPYC). The card records what was used.
    """
    if requested != "bf16-mixed":
        return requested
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if _cpu_has_bf16():
        return requested
    if "cpu" not in _WARNED_PRECISION:
        _WARNED_PRECISION.add("cpu")
        logger.warning("this CPU has no bf16 kernels (oneDNN needs AVX-512): training in fp32 "
                       "instead of train.precision 'bf16-mixed', which would run many times "
                       "slower here")
    return "32"


def _used_precision(cfg: ExperimentConfig) -> str:
    return train_precision(cfg.train.precision, "gpu" if torch.cuda.is_available() else "cpu")


def build_model_for(cfg: ExperimentConfig, bundle: DataBundle) -> tuple[torch.nn.Module, str, dict]:
    """The configured (or the modality's default) network for this bundle."""
    from meddx.models import build_network, check_tta
    from meddx.models.combine import plain_options

    modality = get_modality(bundle.modality)
    name, options = cfg.model.name, dict(cfg.model.options)
    if name is None:
        name, default_options = modality.default_network(bundle.task, bundle.input_spec)
        options = {**default_options, **options}
    spec = modality.network_spec(bundle.input_spec)
    # checked now, not after training; the network trains plain and test-time augmentation
    # wraps it when it is packaged
    if check_tta(name, options.get("tta")) and not cfg.train.augment.flips:
        raise ConfigError("model.options.tta flips the image at test time, but "
                          "train.augment.flips is off (laterality matters here?)",
                          hint="remove model.options.tta, or train with flips")
    model = build_network(name, num_outputs=bundle.task.num_outputs, spec=spec,
                          options=plain_options(options, keep=("members",)))
    if cfg.model.init_weights:
        from meddx.models.combine import Ensemble

        # an ensemble's template: every member starts from the weights
        for net in (model.members if isinstance(model, Ensemble) else [model]):
            _load_init_weights(net, Path(cfg.model.init_weights))
    return model, name, options


def _packaged(model: torch.nn.Module, name: str, options: dict,
              bundle: DataBundle) -> torch.nn.Module:
    """The trained network as packaged: wrapped in test-time augmentation when configured."""
    from meddx.models import with_tta

    spec = get_modality(bundle.modality).network_spec(bundle.input_spec)
    return with_tta(model, name, spec, options.get("tta"))


def _load_init_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"init weights must be an existing .safetensors file: {path}")
    incoming = load_file(str(path))
    own = model.state_dict()
    matched = {k: v for k, v in incoming.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(incoming) - set(matched))
    missing = sorted(set(own) - set(matched))
    logger.info("init weights: loaded %d tensors, skipped %d (shape/name mismatch), %d left "
                "at random init", len(matched), len(skipped), len(missing))
    if skipped:
        logger.info("skipped: %s", ", ".join(skipped[:20]) + (" …" if len(skipped) > 20 else ""))


def _loaders(cfg: ExperimentConfig, bundle: DataBundle) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader

    from meddx.modalities.base import SplitDataset

    modality = get_modality(bundle.modality)
    tr = SplitDataset(modality, bundle.splits["train"], bundle.input_spec,
                      modality.transforms(True, bundle.input_spec, cfg.train.augment))
    va = SplitDataset(modality, bundle.splits["val"], bundle.input_spec, None)
    g = torch.Generator().manual_seed(cfg.seed)
    common = {"collate_fn": modality.collate, "num_workers": cfg.train.num_workers,
              "persistent_workers": cfg.train.num_workers > 0}
    train_loader = DataLoader(tr, batch_size=cfg.train.batch_size, shuffle=True,
                              drop_last=len(tr) > cfg.train.batch_size, generator=g, **common)
    val_loader = DataLoader(va, batch_size=max(cfg.train.batch_size, 256), **common)
    return train_loader, val_loader


def _trainer(cfg: ExperimentConfig, run: Path, progress: bool) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=run / "checkpoints", filename="best", monitor=cfg.train.monitor,
                        mode="max", save_last=True, save_top_k=1, save_weights_only=False),
    ]
    return L.Trainer(
        devices=cfg.train.devices,
        strategy=cfg.train.strategy if cfg.train.devices > 1 else "auto",
        **trainer_options(cfg, run, progress, callbacks),
    )


def trainer_options(cfg: ExperimentConfig, run: Path, progress: bool,
                    callbacks: list[Any]) -> dict[str, Any]:
    """The ``lightning.Trainer`` arguments every meddx run shares (a local run and a Ray Train
    worker alike): epochs, accelerator, precision, early stopping, loggers and limits; the
    caller adds its checkpointing ``callbacks``, devices and strategy."""
    from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    callbacks = list(callbacks)
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=cfg.train.monitor, mode="max",
                                       patience=cfg.train.early_stopping_patience))
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    loggers: list[Any] = [CSVLogger(run, name="logs")]  # logs/version_N/metrics.csv
    try:
        from lightning.pytorch.loggers import MLFlowLogger

        if os.environ.get("MLFLOW_TRACKING_URI"):
            loggers.append(MLFlowLogger(experiment_name=cfg.name))
    except ImportError:
        pass
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = train_precision(cfg.train.precision, accelerator)
    return {
        "max_epochs": cfg.train.epochs,
        "accelerator": accelerator,
        "precision": precision,
        "callbacks": callbacks,
        "logger": loggers,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "deterministic": False,
        "max_time": {"minutes": cfg.train.max_minutes} if cfg.train.max_minutes else None,
        "log_every_n_steps": 10,
        "num_sanity_val_steps": 0,
    }


def train(config: ExperimentConfig | str | Path | dict, out: str | Path | None = None,
          resume: bool = False, progress: bool = True, post_hoc: bool = True,
          bundle: DataBundle | None = None) -> ModelPackage:
    """Train the configured model and write the run folder; returns the ModelPackage.

    Args:
        config: config object, YAML path or dict.
        out: run folder (default ``runs/<config name>``).
        resume: continue from ``<out>/checkpoints/last.ckpt`` (loaded with ``weights_only=True``).
        progress: show progress bars.
        post_hoc: fit calibration, operating points and conformal sets on ``calib`` afterwards.
        bundle: the data already loaded and split for this config (ensemble members share
            their ensemble's split, whatever their own seed).
    """
    import lightning as L

    cfg = as_config(config)
    run = Path(out or Path("runs") / cfg.name)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    members = cfg.model.options.get("members", 1)
    if isinstance(members, int) and members > 1:
        return _train_ensemble(cfg, run, members, resume, progress, post_hoc, bundle)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    bundle = bundle or load_bundle(cfg)
    dump_config(cfg, run / "config.yaml")
    save_splits(bundle, run / "splits.json")
    fit = prepare_fit(cfg, bundle)
    module = fit.module
    trainer = _trainer(cfg, run, progress)
    ckpt = run / "checkpoints" / "last.ckpt"
    if resume and not ckpt.is_file():
        raise ConfigError(f"nothing to resume: {ckpt} does not exist")
    if not resume:
        _clear_checkpoints(run / "checkpoints")
    start = time.perf_counter()
    trainer.fit(module, fit.train_loader, fit.val_loader,
                ckpt_path=str(ckpt) if resume else None, weights_only=True if resume else None)
    wall = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None  # type: ignore[return-value]
    best = restore_best(module, Path(trainer.checkpoint_callback.best_model_path or
                                      run / "checkpoints" / "best.ckpt"))
    return package_fit(cfg, bundle, fit, run / "model", int(trainer.current_epoch), best, wall,
                       post_hoc=post_hoc)


class Fit(NamedTuple):
    """What one training run fits: the Lightning module (its network built from the config),
    the train and val loaders, and the network's registry name and options."""

    module: Any
    train_loader: Any
    val_loader: Any
    net_name: str
    net_options: dict


def prepare_fit(cfg: ExperimentConfig, bundle: DataBundle, batch_size: int | None = None) -> Fit:
    """The module and loaders of a run, built the same way wherever it trains (this process,
    Lightning DDP, or a Ray Train worker); ``batch_size`` overrides the config's per process."""
    from meddx.training.module import MeddxModule

    model, net_name, net_options = build_model_for(cfg, bundle)
    conv = any(isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d) for m in model.modules())
    dims = bundle.input_spec.get("spatial_dims")
    channels_last = cfg.train.channels_last and conv and dims in (2, 3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last if dims == 2
                         else torch.channels_last_3d)
    weights = None
    if cfg.train.class_weighting:
        weights = bundle.task.class_weights(bundle.splits["train"].targets)
    modality = get_modality(bundle.modality)
    module = MeddxModule(model, bundle.task, cfg.train, weights, channels_last=channels_last,
                         batch_augment=modality.batch_transforms(bundle.input_spec, cfg.train.augment))
    if batch_size is not None:
        cfg = cfg.updated(**{"train.batch_size": batch_size})
    train_loader, val_loader = _loaders(cfg, bundle)
    return Fit(module, train_loader, val_loader, net_name, net_options)


def package_fit(cfg: ExperimentConfig, bundle: DataBundle, fit: Fit, folder: Path,
                epochs_run: int, best: dict[str, Any], wall: float, post_hoc: bool = True,
                training: dict[str, Any] | None = None) -> ModelPackage:
    """Package a trained run's network (its best weights already restored) into ``folder``
    and, with ``post_hoc``, fit calibration, operating points, conformal sets and the OOD
    detector on ``calib``; ``training`` adds fields to the card's training record."""
    net = _packaged(fit.module.model.to(memory_format=torch.contiguous_format), fit.net_name,
                    fit.net_options, bundle)
    card = _card(cfg, bundle, fit.net_name, fit.net_options, epochs_run, best, wall)
    if training:
        card = card.model_copy(update={"training": {**card.training, **training}})
    package = save_package(folder, net, card)
    logger.info("saved model package to %s", package.path)
    if post_hoc:
        package = _post_hoc(package, bundle, cfg)
    return package


def _train_ensemble(cfg: ExperimentConfig, run: Path, members: int, resume: bool,
                    progress: bool, post_hoc: bool, bundle: DataBundle | None) -> ModelPackage:
    """A deep ensemble (``model.options.members`` > 1): each member is trained as its own run
    (seed + k for its weights and batches, ``<run>/members/<k>/``, chosen on val like any run)
    on the ensemble's own split (loaded once with the ensemble's seed: a member's seed must not
    move stays between train, val, calib and test) — or on ``train.member_fraction`` of its
    train split, drawn with the member's seed — then the members are joined
    into the network's ensemble module (its ``from_members``), packaged once, and the post-hoc
    fits (temperature, operating points, conformal sets) are made on the ensemble's output.
    Each member is a standard run (its own early stopping, checkpoints and log); with
    ``resume``, members already packaged are kept.
    """
    from meddx.package import load_package

    bundle = bundle or load_bundle(cfg)
    net_options = ensemble_options(cfg, bundle)
    dump_config(cfg, run / "config.yaml")
    save_splits(bundle, run / "splits.json")
    packages, start, trained_here = [], time.perf_counter(), False
    for k in range(members):
        folder = run / "members" / str(k)
        if resume and (folder / "model" / "manifest.json").is_file():
            logger.info("ensemble member %d/%d: kept from %s", k + 1, members, folder)
            packages.append(load_package(folder / "model"))
            continue
        logger.info("ensemble member %d/%d (seed %d)", k + 1, members, cfg.seed + k)
        member_cfg = member_config(cfg, k, net_options)
        _BANNER.repeat = trained_here  # printed with the first member trained here
        try:
            member = train(member_cfg, out=folder, progress=progress, post_hoc=False,
                           bundle=member_bundle(bundle, cfg.train.member_fraction,
                                                 cfg.seed + k))
        finally:
            _BANNER.repeat = False
        trained_here = True
        if member is None:  # non-zero DDP rank: rank 0 joins and packages
            return None  # type: ignore[return-value]
        packages.append(member)
    return join_members(cfg, run, bundle, packages, time.perf_counter() - start, post_hoc)


def ensemble_options(cfg: ExperimentConfig, bundle: DataBundle) -> dict:
    """The ensemble's network options, once its network is known to join members.

    Raises:
        ConfigError: the configured network has no ``from_members``.
    """
    template, net_name, net_options = build_model_for(cfg, bundle)
    if not callable(getattr(type(template), "from_members", None)):
        raise ConfigError(f"network '{net_name}' cannot be trained as an ensemble",
                          hint="remove model.options.members")
    return net_options


def member_config(cfg: ExperimentConfig, k: int, net_options: dict) -> ExperimentConfig:
    """Ensemble member ``k``'s own config: its name, seed ``seed + k`` and the plain network."""
    from meddx.models.combine import plain_options

    return cfg.updated(**{"name": f"{cfg.name}-member{k}", "seed": cfg.seed + k,
                          "model.options": plain_options(net_options)})


def join_members(cfg: ExperimentConfig, run: Path, bundle: DataBundle,
                 packages: list[ModelPackage], wall: float, post_hoc: bool = True) -> ModelPackage:
    """Join trained member packages into the ensemble's package at ``<run>/model`` (the
    network's ``from_members``), choose-score it on val and, with ``post_hoc``, fit the
    post-hoc fits on calib — wherever the members were trained (here, or as Ray tasks)."""
    import numpy as np

    from meddx.training.module import selection_score
    from meddx.training.posthoc import split_logits

    members = len(packages)
    template, net_name, net_options = build_model_for(cfg, bundle)
    join = type(template).from_members
    model = _packaged(join([p.build_model() for p in packages]), net_name, net_options, bundle)
    card = packages[0].card
    training = {
        "config": cfg.model_dump(mode="json"),
        "members": [{"seed": cfg.seed + k, "epochs_run": p.card.training.get("epochs_run"),
                     "best_epoch": p.card.training.get("best_epoch"),
                     "best_score": p.card.training.get("best_score"),
                     "wall_time_s": p.card.training.get("wall_time_s")}
                    for k, p in enumerate(packages)],
        "selection_metric": cfg.train.monitor, "selected_on": "val",
        "wall_time_s": round(sum(p.card.training.get("wall_time_s") or 0 for p in packages), 1),
        "threads": torch.get_num_threads(), "precision": _used_precision(cfg), "seed": cfg.seed,
    }
    card = card.model_copy(update={"name": cfg.name, "network": {"name": net_name,
                                                                 "options": net_options},
                                   "training": training})
    package = save_package(run / "model", model, card)
    val = bundle.splits["val"]
    logits = torch.from_numpy(split_logits(package, val))
    score = selection_score(bundle.task, np.asarray(val.targets),
                            bundle.task.probabilities(logits).numpy())
    package.update_card(training={**training, "best_score": float(score)})
    logger.info("saved ensemble of %d members to %s (%s on val %.4f; %.0f s)", members,
                package.path, cfg.train.monitor, score, wall)
    if post_hoc:
        package = _post_hoc(package, bundle, cfg)
    return package


def member_bundle(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """The ensemble's bundle, its train split cut to ``fraction`` (stratified, drawn with the
    member's seed); val, calib, test and the preprocessing stay the ensemble's."""
    import dataclasses

    from meddx.modalities.base import carve_split

    if fraction >= 1:
        return bundle
    train_split = bundle.splits["train"]
    kept, _ = carve_split(train_split, 1 - fraction, seed,
                          bundle.task.target_index(train_split.targets), "left out")
    return dataclasses.replace(bundle, splits={**bundle.splits, "train": kept})


def _clear_checkpoints(folder: Path) -> None:
    """A fresh run in an old folder must never pick up the previous run's weights."""
    old = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if old:
        logger.warning("starting a new run in %s: removing %d old checkpoint(s) "
                       "(use --resume to continue instead)", folder.parent, len(old))
        for f in old:
            f.unlink()


def restore_best(module: Any, best: Path) -> dict[str, Any]:
    if not best.is_file():
        return {}
    state = torch.load(best, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    for cb_key, cb_state in state.get("callbacks", {}).items():
        if cb_key.startswith("ModelCheckpoint"):
            score = cb_state.get("best_model_score")
            return {"best_score": None if score is None else float(score),
                    "best_epoch": int(state.get("epoch", -1))}
    return {"best_epoch": int(state.get("epoch", -1))}


def _card(cfg: ExperimentConfig, bundle: DataBundle, net_name: str, net_options: dict,
          epochs_run: int, best: dict[str, Any], wall: float) -> ModelCard:
    info = bundle.info
    summary = bundle.summary()
    return ModelCard(
        name=cfg.name,
        modality=bundle.modality,
        task=bundle.task,
        network={"name": net_name, "options": net_options},
        preprocessing=bundle.input_spec,
        training_data={"dataset": bundle.dataset, **{k: v for k, v in info.items() if _jsonable(v)},
                       **summary, "split_sha256": split_fingerprints(bundle)},
        training={
            "config": cfg.model_dump(mode="json"),
            "epochs_run": epochs_run,
            "selection_metric": cfg.train.monitor,
            "selected_on": "val",
            **best,
            "wall_time_s": round(wall, 1),
            "threads": torch.get_num_threads(),
            "precision": _used_precision(cfg),
            "seed": cfg.seed,
        },
        intended_use=cfg.intended_use or "Research on medical deep learning; not for diagnosis.",
        research_only=cfg.research_only,
        license=str(info.get("license", "unknown")),
    )


def split_fingerprints(bundle: DataBundle) -> dict[str, str]:
    """SHA-256 of each split's sorted sample ids: packages with equal fingerprints were
    trained, selected and calibrated on the same cases (``meddx ensemble`` checks them)."""
    import hashlib

    return {name: hashlib.sha256("\n".join(sorted(map(str, s.ids))).encode()).hexdigest()
            for name, s in bundle.splits.items()}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def save_splits(bundle: DataBundle, path: Path) -> None:
    """Write each split's sample ids (and hashed patient ids) to ``splits.json``."""
    out = {}
    for name, s in bundle.splits.items():
        out[name] = {"ids": s.ids}
        if s.patient_ids:
            # patient ids are hashed: the run folder must not carry identifiers
            import hashlib

            out[name]["patients_sha256"] = sorted(
                {hashlib.sha256(p.encode()).hexdigest()[:16] for p in s.patient_ids})
    path.write_text(json.dumps(out))


def _post_hoc(package: ModelPackage, bundle: DataBundle, cfg: ExperimentConfig) -> ModelPackage:
    """Fit temperature, operating points and conformal sets on ``calib`` (never val or test)."""
    from meddx.training.posthoc import fit_post_hoc

    derived = list(bundle.input_spec.get("derived_features") or [])
    if "calib" not in bundle.splits or len(bundle.splits["calib"]) == 0:
        if cfg.side_inputs or derived:
            raise ConfigError("side inputs and derived features are fitted on the calibration "
                              "split; there is none", hint="set data.calib_fraction > 0")
        logger.warning("no calibration split: package left uncalibrated")
        return package
    if cfg.side_inputs or derived:  # before the post-hoc fits: they act on the fused logits
        from meddx.training.sideinputs import fit_side_inputs

        try:
            fit_side_inputs(package, bundle, cfg.side_inputs, derived=derived, seed=cfg.seed)
        except EvaluationError as e:
            if cfg.side_inputs:  # inputs the user asked for: no package without them
                raise
            # features the modality derives (a recipe default): a tiny run still trains
            logger.warning("derived features not fused, the package is the network alone: %s "
                           "(use more records)", e.message)
    fit_post_hoc(package, bundle, cfg.evaluation)
    return package
