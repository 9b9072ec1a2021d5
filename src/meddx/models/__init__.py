"""Network factory: a registry of builders, thin over monai.networks and field libraries.

Every builder is a function ``builder(*, spatial_dims, in_channels, num_outputs, size,
**options) -> torch.nn.Module`` decorated with :func:`meddx.models.base.network`, which records
an example spec and input so the contract tests cover every entry without a new test.
The network emits ``TaskSpec.num_outputs`` logits; the task decides activation and loss.
"""

from __future__ import annotations

from typing import Any

import torch

from meddx.errors import ConfigError
from meddx.registry import Registry

__all__ = ["MODELS", "build_network"]

MODELS: Registry[Any] = Registry("model")
# images (2D and 3D through spatial_dims)
MODELS.register("resnet18", "meddx.models.image:resnet18")
MODELS.register("resnet34", "meddx.models.image:resnet34")
MODELS.register("resnet50", "meddx.models.image:resnet50")
MODELS.register("densenet121", "meddx.models.image:densenet121")
MODELS.register("efficientnet_b0", "meddx.models.image:efficientnet_b0")
# waveforms
MODELS.register("resnet1d", "meddx.models.ecg:resnet1d")
MODELS.register("cnn_gru", "meddx.models.ecg:cnn_gru")
# DNA sequences
MODELS.register("seq_cnn", "meddx.models.sequence:seq_cnn")
MODELS.register("seq_cnn_gru", "meddx.models.sequence:seq_cnn_gru")
# molecules
MODELS.register("dmpnn", "meddx.models.molecule:dmpnn")
MODELS.register("ecfp_mlp", "meddx.models.molecule:ecfp_mlp")
# EHR time series and tables
MODELS.register("grud", "meddx.models.ehr:grud")
MODELS.register("ehr_transformer", "meddx.models.ehr:ehr_transformer")
MODELS.register("logistic", "meddx.models.ehr:logistic")
MODELS.register("mlp", "meddx.models.ehr:mlp")


def build_network(
    name: str, *, num_outputs: int, spec: dict[str, Any], options: dict[str, Any] | None = None
) -> torch.nn.Module:
    """Build the network ``name`` for a task with ``num_outputs`` logits.

    Args:
        name: registry key (``meddx models`` lists them).
        num_outputs: width of the last layer (``TaskSpec.num_outputs``).
        spec: ``spatial_dims``, ``in_channels``, ``size`` and modality-specific keys.
        options: builder options from the config (``model.options``).

    Raises:
        ConfigError: unknown name, unknown option, or an input the network cannot take.
    """
    builder = MODELS.get(name)
    try:
        return builder(num_outputs=num_outputs, **spec, **(options or {}))
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not accept these options: {e}") from e
