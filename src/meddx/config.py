"""Experiment configuration: pydantic models, frozen, no unknown keys, YAML in and out.

Components are named by registry key (``model.name: resnet18``), never by import path.
Modality-specific data options live in ``data.options`` and are validated by the modality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meddx.errors import ConfigError
from meddx.sideinputs import SideInput, resolve_side_inputs
from meddx.tasks import TaskSpec

__all__ = [
    "DataConfig",
    "ModelConfig",
    "AugmentConfig",
    "TrainConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "load_config",
    "dump_config",
    "parse_key_value",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """Where the data comes from and how it is split.

    Args:
        dataset: a catalog name (``meddx datasets``); or leave empty and give ``path``.
        path: a local file or folder (e.g. images + ``labels.csv``) read by ``modality``.
        modality: registry key of the modality; taken from the catalog when ``dataset`` is set.
        size: input size for image datasets (MedMNIST: 28, 64, 128 or 224).
        split: how to split when the source has no fixed split (``random``, ``scaffold`` …).
        val_fraction / test_fraction: used only when the source has no fixed split.
        calib_fraction: share of train carved out for calibration (stratified, by patient).
        limit: keep at most this many samples per split (quick runs and tests).
        options: modality-specific options, validated by the modality.
    """

    dataset: str | None = None
    path: str | None = None
    modality: str | None = None
    size: int | None = None
    split: str = "default"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    calib_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Frozen):
    """The network: a registry name plus its options."""

    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    init_weights: str | None = None


class AugmentConfig(_Frozen):
    """Training-time augmentation. ``flips`` off where laterality matters (chest X-ray)."""

    enabled: bool = True
    flips: bool = True
    rotate_degrees: float = 10.0
    intensity: float = 0.1
    noise: float = 0.0


class TrainConfig(_Frozen):
    """The training loop (Lightning)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    scheduler: Literal["none", "multistep", "cosine", "onecycle"] = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    class_weighting: bool = False
    early_stopping_patience: int | None = Field(10, ge=1)
    monitor: str = "val_auroc"
    precision: Literal["bf16-mixed", "32"] = "bf16-mixed"
    channels_last: bool = True
    devices: int = Field(1, ge=1)
    strategy: str = "auto"
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    max_minutes: float | None = Field(None, gt=0)
    # deep ensembles (model.options.members > 1): each member trains on this fraction of the
    # train split, drawn with the member's seed (diversity as in bagging); 1.0 = all of it
    member_fraction: float = Field(1.0, gt=0, le=1)


class EvaluationConfig(_Frozen):
    """What the evaluation fits on ``calib`` and reports on ``test``."""

    target_sensitivity: float = Field(0.95, gt=0, lt=1)
    target_specificity: float = Field(0.90, gt=0, lt=1)
    # the card's default decision rule; every binary card holds all four points, and
    # `meddx predict/serve --operating-point NAME` picks another per deployment
    default_operating_point: Literal["sensitivity", "specificity", "youden",
                                     "balanced"] = "sensitivity"
    alpha: float = Field(0.1, gt=0, lt=1)
    conformal_method: Literal["lac", "aps"] = "lac"
    bootstrap: int = Field(1000, ge=0)
    calibrate: bool = True
    # out-of-distribution detector fitted with the post-hoc fits (meddx.training.ood):
    # "auto" = Mahalanobis on the head layer's input where the network has one, else energy
    ood_detector: Literal["auto", "mahalanobis", "energy", "off"] = "auto"
    ood_false_alarm: float = Field(0.05, gt=0, lt=1)
    # the in-distribution scores the OOD threshold is the conformal quantile of: "calib" alone,
    # or "crossfit": calib pooled with the train split's out-of-fold Mahalanobis scores
    # (Gaussians refitted on ood_folds - 1 folds; energy detectors use calib alone); "auto":
    # crossfit unless those scores differ from calib's (meddx.statistics.ood.pool_scores)
    ood_threshold_scores: Literal["auto", "calib", "crossfit"] = "auto"
    ood_folds: int = Field(5, ge=2, le=20)


class ExperimentConfig(_Frozen):
    """One experiment: data → task → model → training → evaluation → package."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskSpec | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    intended_use: str | None = None
    research_only: bool = True
    # tabular inputs beside the main one (preset names "age", "sex", "site" or full entries),
    # late-fused with the network's logits on calib (meddx.sideinputs; docs: imaging page)
    side_inputs: list[SideInput] = Field(default_factory=list)

    @field_validator("side_inputs", mode="before")
    @classmethod
    def _presets(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        try:
            return resolve_side_inputs(v)
        except ConfigError as e:
            raise ValueError(e.message) from e

    def updated(self, **dotted: Any) -> ExperimentConfig:
        """Return a copy with dotted keys replaced (``{"train.epochs": 3}``); None values skipped."""
        raw = self.model_dump()
        for key, value in dotted.items():
            if value is None:
                continue
            node = raw
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return parse_config(raw)


def parse_config(raw: dict[str, Any], source: str | None = None) -> ExperimentConfig:
    """Validate a dict as an :class:`ExperimentConfig`, with readable errors."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{where}'")
            else:
                problems.append(f"{where}: {err['msg']}")
        raise ConfigError(
            "invalid configuration: " + "; ".join(problems),
            path=source,
            hint="see configs/*.yaml for complete examples",
        ) from e


def load_config(path: str | Path) -> ExperimentConfig:
    """Read a YAML experiment file (``yaml.safe_load``; no tags, no expressions)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}", path=str(p))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}", path=str(p)) from e
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping at the top level", path=str(p))
    return parse_config(raw, source=str(p))


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (what a run used, saved beside its outputs)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def parse_key_value(text: str, flag: str = "--option") -> tuple[str, Any]:
    """``KEY=VALUE`` typed on a command line; the value is read as YAML (numbers, booleans,
    lists, plain text).

    Raises:
        ConfigError: no ``=``, an empty key, or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} '{text}' is not KEY=VALUE",
                          hint=f"e.g. {flag} fs=100 (repeat {flag} for more)")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} {key}: the value {raw!r} is not valid YAML",
                          hint="quote text with YAML's special characters: key='a: b'") from e
