"""Network factory: a registry of builders, thin over monai.networks and field libraries.

Every builder is a function ``builder(*, spatial_dims, in_channels, num_outputs, size,
**options) -> torch.nn.Module`` decorated with :func:`meddx.modalities.networks.network`, which records
an example spec and input so the contract tests cover every entry without a new test.
The network emits ``TaskSpec.num_outputs`` logits; the task decides activation and loss.
"""

from __future__ import annotations

from typing import Any

import torch

from meddx.errors import ConfigError
from meddx.modalities import registered
from meddx.registry import Registry

__all__ = ["MODELS", "build_network"]

MODELS: Registry[Any] = Registry("model")
# entries come from the modality folders' NETWORKS (meddx/modalities/<name>/networks.py)
for _name, _target in registered("NETWORKS").items():
    MODELS.register(_name, _target)

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
