"""The clinical service: REST, FHIR R4 (``fhir.resources.R4B``), CDS Hooks 2.0 and a web page.

``create_app(packages, settings)`` builds the FastAPI app; ``meddx serve`` runs it with uvicorn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from meddx.serving.app import create_app

        return create_app
    if name == "ServeSettings":
        from meddx.serving.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'meddx.serving' has no attribute {name!r}")
