"""Name → component registries with lazy imports and did-you-mean errors.

Entries are ``"package.module:attr"`` strings imported on first use, so
``import meddx`` stays fast and optional dependencies are only needed by the
components that use them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from meddx.errors import ConfigError

__all__ = ["Registry", "load_target", "suggest"]

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or a list of choices."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; choose one of: {', '.join(sorted(choices))}"


def load_target(target: str, what: str | None = None) -> Any:
    """Import ``"module:attr"`` and return the attribute.

    Raises:
        ConfigError: the module is missing, or needs a package that is not installed.
    """
    module_name, attr = target.split(":", 1)
    what = what or target
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "meddx":
            raise ConfigError(f"{what} is registered but its module {e.name} is missing") from e
        raise ConfigError(
            f"{what} needs a package that is not installed: {e.name}",
            hint="install meddx with its extras: pip install 'meddx[all]'",
        ) from e
    return getattr(module, attr)


class Registry(Generic[T]):
    """A named collection of lazily imported components.

    Args:
        kind: what the entries are ("model", "modality" …), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, str | T] = {}
        self._loaded: dict[str, T] = {}

    def register(self, name: str, target: str | T, *, overwrite: bool = False) -> None:
        """Add ``name``; ``target`` is an object or a ``"module:attr"`` string."""
        key = name.lower()
        if key in self._entries and not overwrite:
            raise ConfigError(f"{self.kind} '{name}' is already registered", name=name)
        if isinstance(target, str) and ":" not in target:
            raise ConfigError(
                f"lazy {self.kind} entry must look like 'module:attr', got {target!r}", name=name
            )
        self._entries[key] = target
        self._loaded.pop(key, None)

    def get(self, name: str) -> T:
        """Return the component for ``name``, importing it on first use."""
        key = str(name).lower()
        if key not in self._entries:
            raise ConfigError(f"unknown {self.kind} '{name}'" + suggest(key, list(self._entries)))
        if key not in self._loaded:
            target = self._entries[key]
            if isinstance(target, str):
                target = load_target(target, f"{self.kind} '{name}'")
            self._loaded[key] = target
        return self._loaded[key]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
