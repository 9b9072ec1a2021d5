"""Helpers shared by network builders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["network", "network_builder"]


def network(
    *,
    modality: str,
    example_spec: dict[str, Any],
    example_input: Callable[[dict[str, Any], int], Any],
    gradcam_layer: Callable[[dict[str, Any]], str | None] | str | None = None,
) -> Callable:
    """Mark a builder: which modality it serves, an example spec and input for contract tests,
    and the default Grad-CAM target layer (a name, or a function of the spec)."""

    def deco(fn: Callable) -> Callable:
        fn.modality = modality
        fn.example_spec = example_spec
        fn.example_input = example_input
        fn.gradcam_layer = gradcam_layer
        return fn

    return deco


def network_builder(name: str) -> Callable | None:
    """The builder registered as network ``name`` by any modality folder, or None.

    For modality code that needs a builder's marks (e.g. its ``gradcam_layer``) without
    reaching up into :mod:`meddx.models`.
    """
    from meddx.modalities import registered
    from meddx.registry import load_target

    target = registered("NETWORKS").get(str(name).lower())
    return None if target is None else load_target(target, f"network '{name}'")
