"""The interactive API docs (``/docs``, ``/redoc``): off unless ``--api-docs``, and then served
from this service alone.

FastAPI's defaults load Swagger UI, ReDoc and Google Fonts from public CDNs, which a hospital
network may block and which would tell a third party who reads the docs. Here the assets come
from the ``fastapi-offline`` wheel (Swagger UI and ReDoc bundles, no code of it is used),
under ``/docs-assets``, and each page has a Content-Security-Policy that allows only this
origin (the one inline script of Swagger UI is allowed by its hash). ``/openapi.json`` stays
available either way: it describes the API, holds no data, and clients generate code from it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from meddx.errors import ConfigError

__all__ = ["install_api_docs", "ASSETS_PATH", "docs_csp"]

ASSETS_PATH = "/docs-assets"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _assets() -> Path:
    try:
        return Path(str(resources.files("fastapi_offline").joinpath("static")))
    except ModuleNotFoundError as e:
        raise ConfigError("--api-docs needs the Swagger UI and ReDoc assets of the "
                          "fastapi-offline package, which is not installed",
                          hint="pip install 'meddx[serve]' (or drop --api-docs)") from e


def docs_csp(page: str) -> str:
    """The policy of a docs page: this origin only; inline scripts only by their hash."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(page))
    return ("default-src 'none'; "
            f"script-src 'self' {hashes}".rstrip() + "; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; "
            "connect-src 'self'; worker-src 'self' blob:; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'")


def _page(response: HTMLResponse) -> HTMLResponse:
    page = bytes(response.body).decode()
    return HTMLResponse(page, headers={"Content-Security-Policy": docs_csp(page),
                                       "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer",
                                       "Cache-Control": "no-store"})


def install_api_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` with local assets (``app`` built with no docs URLs)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=str(_assets())), name="docs-assets")
    title = f"{app.title} — API"
    openapi = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return _page(get_swagger_ui_html(
            openapi_url=openapi, title=title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None}))  # no badge from validator.swagger.io

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return _page(get_redoc_html(
            openapi_url=openapi, title=title, redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png", with_google_fonts=False))
