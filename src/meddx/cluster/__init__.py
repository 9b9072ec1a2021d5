"""Batch work beyond one machine on Ray: archive inference, slide cohorts, training.

This layer sits between :mod:`meddx.serving` and :mod:`meddx.commands`: only the CLI imports
it, and nothing below it imports Ray. Ray itself is imported lazily (``meddx[cluster]`` extra),
so ``import meddx`` and ``meddx --help`` stay fast.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from meddx.errors import ConfigError

__all__ = ["INSTALL_HINT", "require_ray", "connect"]

INSTALL_HINT = "pip install 'meddx[cluster]'"


def require_ray() -> ModuleType:
    """Import Ray, or raise a :class:`ConfigError` saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise ConfigError("Ray is not installed; cluster commands need the 'cluster' extra",
                          hint=INSTALL_HINT) from e


def connect(address: str | None, **init_kwargs: Any) -> ModuleType:
    """Join the Ray cluster at ``address`` (``host:port``, ``auto`` or ``ray://…``).

    ``None`` or an empty address starts a local single-machine Ray, which is what a laptop
    user wants; on a cluster pass the head's address (or set ``RAY_ADDRESS``).
    """
    ray = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    addr = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=addr, logging_level="ERROR", log_to_driver=False,
                 include_dashboard=False if addr is None else None, **init_kwargs)
    except ConnectionError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {addr!r}",
                          hint="start it with `ray start --head` and pass its host:port",
                          address=addr) from e
    return ray
