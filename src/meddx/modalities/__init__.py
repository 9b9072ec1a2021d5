"""Modalities: the contract every modality fills, and one folder per modality.

A modality is a package ``meddx/modalities/<name>/`` that holds everything particular to its
kind of data: readers, the :class:`~meddx.modalities.base.Modality` subclass, networks,
explainer, task-specific scores, FHIR mapping, CDS Hooks adapter, catalog entries
(``catalog.yaml``) and training recipes (``recipes/*.yaml``). Its ``__init__.py`` names, as
``"module:attr"`` strings (nothing heavy is imported until used), what it registers:

* ``MODALITIES``: modality name → its ``Modality`` class;
* ``NETWORKS``: network name → its builder (read by :mod:`meddx.models`);
* ``CDS_ADAPTERS``: modality name → its CDS Hooks adapter (read by :mod:`meddx.serving.cds`);
* ``COMMANDS``: a ``register(app)`` function adding CLI commands, or None (read by the CLI).

Adding a modality is one new folder and one line in :data:`PACKAGES`. The layers above
(training, inference, evaluation, serving, commands) know modalities only through this
registry and the contract.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from meddx.errors import ConfigError
from meddx.modalities.base import DataBundle, Modality, Sample, Split
from meddx.registry import Registry

__all__ = [
    "MODALITIES",
    "PACKAGES",
    "DataBundle",
    "Modality",
    "Sample",
    "Split",
    "get_modality",
    "modality_packages",
    "registered",
]

# one line per modality folder
PACKAGES: tuple[str, ...] = (
    "image",
    "ecg",
    "sequence",
    "molecule",
    "ehr",
    "pathology",
)


def modality_packages() -> list[ModuleType]:
    """The modality folders' ``__init__`` modules (light: they hold only strings)."""
    return [importlib.import_module(f"meddx.modalities.{name}") for name in PACKAGES]


def registered(attribute: str) -> dict[str, str]:
    """Every modality folder's ``attribute`` dict (``NETWORKS``, ``CDS_ADAPTERS`` …) merged;
    a name registered by two folders is an error at import, not a silent override."""
    out: dict[str, str] = {}
    for package in modality_packages():
        for key, target in (getattr(package, attribute, None) or {}).items():
            if key in out:
                raise ConfigError(f"{attribute} '{key}' registered twice "
                                 f"({out[key]} and {target})")
            out[key] = target
    return out


MODALITIES: Registry[type[Modality]] = Registry("modality")
for _name, _target in registered("MODALITIES").items():
    MODALITIES.register(_name, _target)


def get_modality(name: str) -> Modality:
    """An instance of the modality registered as ``name``."""
    return MODALITIES.get(name)()
