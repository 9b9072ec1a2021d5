"""Reading a config's dataset into a :class:`~meddx.modalities.base.DataBundle`.

The one place where a config (object, YAML path or dict) becomes data: the catalog entry is
looked up, the modality named there (or in ``data.modality``) reads and splits it (calib carved
from train). Training, evaluation, ONNX calibration and the benchmarks all load data here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meddx.catalog import get_entry
from meddx.config import ExperimentConfig, load_config
from meddx.errors import ConfigError
from meddx.modalities import DataBundle, get_modality

__all__ = ["as_config", "load_bundle"]


def as_config(config: ExperimentConfig | str | Path | dict[str, Any]) -> ExperimentConfig:
    """Accept a config object, a YAML path, or a dict."""
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        from meddx.config import parse_config

        return parse_config(config)
    return load_config(config)


def load_bundle(config: ExperimentConfig | str | Path | dict[str, Any]) -> DataBundle:
    """Read and split the config's dataset with its modality (calib carved from train)."""
    cfg = as_config(config)
    entry = get_entry(cfg.data.dataset) if cfg.data.dataset else None
    modality_name = cfg.data.modality or (entry.modality if entry else None)
    if modality_name is None:
        raise ConfigError("set data.dataset (a catalog name) or data.modality with data.path")
    if entry is None and not cfg.data.path:
        raise ConfigError("set data.dataset or data.path")
    modality = get_modality(modality_name)
    task = cfg.task or (entry.task if entry else None)
    bundle = modality.load(cfg.data, entry, task, cfg.seed)
    for name in ("train", "val"):
        if name not in bundle.splits or len(bundle.splits[name]) == 0:
            raise ConfigError(f"dataset has no samples in split '{name}'")
    return bundle
