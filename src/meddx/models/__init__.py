"""Network factory: a registry of builders, thin over monai.networks and field libraries.

Every builder is a function ``builder(*, spatial_dims, in_channels, num_outputs, size,
**options) -> torch.nn.Module`` decorated with :func:`meddx.modalities.networks.network`, which records
an example spec and input so the contract tests cover every entry without a new test.
The network emits ``TaskSpec.num_outputs`` logits; the task decides activation and loss.

Two options are the platform's, not a builder's (:mod:`meddx.models.combine`): ``members: K``
builds a deep ensemble of K copies (unless the builder fuses its own), ``tta: hflip|flips``
wraps an image network in flip test-time augmentation.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from meddx.errors import ConfigError
from meddx.modalities import registered
from meddx.registry import Registry

__all__ = ["MODELS", "build_network", "check_tta", "with_tta"]

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
    from meddx.models.combine import Ensemble

    builder = MODELS.get(name)
    options = dict(options or {})
    tta = options.pop("tta", None)
    members = options.get("members", 1)
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ConfigError(f"model.options.members must be a whole number ≥ 1, got {members!r}")
    own_ensemble = "members" in inspect.signature(builder).parameters
    if not own_ensemble:
        options.pop("members", None)
    try:
        if members > 1 and not own_ensemble:
            model: torch.nn.Module = Ensemble(
                [builder(num_outputs=num_outputs, **spec, **options) for _ in range(members)])
        else:
            model = builder(num_outputs=num_outputs, **spec, **options)
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not accept these options: {e}") from e
    return with_tta(model, name, spec, tta)


def check_tta(name: str, tta: str | None) -> str | None:
    """The test-time augmentation mode ``tta`` for network ``name``: None for none.

    Raises:
        ConfigError: an unknown mode, or a network that does not take images.
    """
    from meddx.models.combine import TTA_MODES

    if tta in (None, "none"):
        return None
    if tta not in TTA_MODES:
        raise ConfigError(f"unknown test-time augmentation '{tta}'",
                          hint="choose one of: " + ", ".join(TTA_MODES))
    from meddx.modalities import MODALITIES

    modality = getattr(MODELS.get(name), "modality", None)
    if modality not in MODALITIES or not MODALITIES.get(modality).flip_tta:
        raise ConfigError(f"test-time flips are for image networks; '{name}' is not one",
                          hint="remove model.options.tta")
    return str(tta)


def with_tta(model: torch.nn.Module, name: str, spec: dict[str, Any],
             tta: str | None) -> torch.nn.Module:
    """``model`` wrapped in flip test-time augmentation (``tta``: ``hflip`` or ``flips``);
    unchanged for None or ``"none"``.

    Raises:
        ConfigError: see :func:`check_tta`.
    """
    from meddx.models.combine import FlipTTA

    mode = check_tta(name, tta)
    return model if mode is None else FlipTTA(model, int(spec.get("spatial_dims", 2)), mode)
