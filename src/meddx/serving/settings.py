"""Settings of the clinical service (pydantic, frozen, ``extra="forbid"``).

Every limit the service enforces lives here with its default, so that ``meddx serve`` flags,
a YAML file and tests all configure the same object.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meddx.errors import ConfigError

__all__ = ["IssuerTrust", "ServeSettings", "load_api_keys", "load_trust", "LOOPBACK_HOSTS",
           "parse_operating_points", "ALL_MODELS", "valid_origin"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
#: key of ``ServeSettings.operating_points`` for "every served model that has operating points"
ALL_MODELS = "*"
SAFE_ALGS = ("ES384", "RS384", "ES256", "RS256")
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


class IssuerTrust(BaseModel):
    """One allow-listed token issuer (an EHR, or a client of the REST API).

    Args:
        iss: the exact ``iss`` claim.
        jwks: the issuer's public keys as a JWKS (``{"keys": [...]}``), or
        jwks_file: a local file holding that JWKS.
        jku_allow: URLs the issuer may name in a token's ``jku`` header; keys are then
            fetched from there (cached). A ``jku`` not in this list is rejected unfetched.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    iss: str
    jwks: dict[str, Any] | None = None
    jwks_file: Path | None = None
    jku_allow: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _keys_present(self) -> IssuerTrust:
        if self.jwks is None and self.jwks_file is None and not self.jku_allow:
            raise ValueError(f"issuer {self.iss!r} needs jwks, jwks_file or jku_allow")
        return self


class ServeSettings(BaseModel):
    """How the service runs, whom it trusts and which limits it enforces."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(
        None, description="external base URL; JWT `aud` must equal the URL of the endpoint called"
    )
    # --- trust
    issuers: tuple[IssuerTrust, ...] = ()
    api_keys: dict[str, str] = Field(default_factory=dict, description="key id → sha256 hex")
    insecure_no_auth: bool = False
    algorithms: tuple[str, ...] = SAFE_ALGS
    iat_window_s: int = Field(300, gt=0, description="oldest accepted `iat`, seconds")
    clock_skew_s: int = Field(30, ge=0)
    replay_cache_size: int = Field(100_000, gt=0)
    jku_timeout_s: float = 3.0
    jku_cache_s: int = 600
    # --- models and use
    trust_keys: tuple[Path, ...] = Field((), description="Ed25519 public keys (PEM); when "
                                         "given, only packages signed by one of them load")
    research_use: bool = False
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    warmup: bool = True
    operating_points: dict[str, str] = Field(
        default_factory=dict, description="decision rule per deployment: model name → a name "
        "from its card's operating points; '*' → every model with operating points (a named "
        "model's entry wins)")
    # --- limits
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_batch: int = Field(32, gt=0)
    max_in_flight: int = Field(32, gt=0, description="admitted requests (running + waiting)")
    workers: int = Field(2, gt=0, description="requests computing at once")
    queue_size: int | None = Field(None, ge=0, description="requests waiting for admission "
                                   "(FIFO); more get 429. None: 2 × max_in_flight; 0: no queue")
    queue_timeout_s: float = Field(10.0, gt=0, description="longest wait before a request runs: "
                                   "still queued → 429, admitted but no worker free → 503")
    request_timeout_s: float = Field(30.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0, description="longest time to receive a request "
                                  "body (slide uploads exempt); then 408 and the connection "
                                  "is closed")
    body_idle_timeout_s: float = Field(15.0, gt=0, description="longest wait for the next "
                                       "chunk of any request body, slide uploads included; "
                                       "then 408")
    retry_after_s: int = 1
    threads: int | None = Field(None, description="torch intra-op threads per worker")
    # --- audit, heat maps, CDS
    audit_log: Path | None = None
    audit_fsync: bool = False
    heatmap_dir: Path | None = None
    heatmap_ttl_s: int = Field(24 * 3600, gt=0)
    link_secret: str = Field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    feedback_log: Path | None = None
    critical_risk: float = Field(0.8, gt=0, le=1)
    cds_explain: bool = Field(True, description="explain on cards: a heat-map page behind a "
                              "link for images, top findings for others")
    fhir_server_allow: tuple[str, ...] = ()
    fhir_timeout_s: float = 3.0
    # --- jobs (whole-slide images; see serving/jobs.py)
    jobs_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0,
                              description="jobs running at once (one per core)")
    jobs_queue: int = Field(8, ge=0, description="jobs waiting at once; more get 429")
    job_dir: Path | None = Field(None, description="server-owned folder for job files")
    slide_roots: tuple[Path, ...] = Field((), description="folders whose slides jobs may read")
    max_slide_bytes: int = Field(4 * 1024**3, gt=0)
    # --- browsers and docs
    cors_origins: tuple[str, ...] = Field((), description="browser origins (scheme://host"
                                          "[:port]) allowed cross-origin calls, e.g. a "
                                          "browser-based CDS client; empty: no CORS headers")
    api_docs: bool = Field(False, description="serve /docs and /redoc (assets from this "
                           "service only)")
    # --- monitoring
    metrics: Literal["auth", "open", "off"] = Field(
        "auth", description="GET /metrics: behind the REST authentication (auth), without "
        "it for a scraper on a private network (open), or not served and not counted (off)")

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for origin in v:
            if not valid_origin(origin):
                raise ValueError(f"CORS origin {origin!r} is not scheme://host[:port] (no "
                                 "path, no wildcard); list each allowed origin exactly")
        return tuple(o.lower() for o in v)

    @field_validator("algorithms")
    @classmethod
    def _safe_algs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if a not in SAFE_ALGS]
        if bad:
            raise ValueError(f"algorithms {bad} are not allowed; choose from {SAFE_ALGS}")
        return v

    @model_validator(mode="after")
    def _no_auth_only_on_loopback(self) -> ServeSettings:
        if self.insecure_no_auth and self.host not in LOOPBACK_HOSTS:
            raise ValueError("--insecure-no-auth binds to loopback only (127.0.0.1)")
        return self

    @property
    def admission_queue(self) -> int:
        """Requests that may wait for admission (``queue_size``, default 2 × max_in_flight)."""
        return 2 * self.max_in_flight if self.queue_size is None else self.queue_size

    @property
    def base_url(self) -> str:
        """The public base URL (``public_url`` or ``http://host:port``)."""
        return self.public_url or f"http://{self.host}:{self.port}"

    def url_for(self, path: str) -> str:
        """Absolute public URL of ``path`` (the exact JWT audience for that endpoint)."""
        return self.base_url + "/" + path.lstrip("/")


def valid_origin(origin: str) -> bool:
    """True for an exact browser origin ``scheme://host[:port]`` (no path, no wildcard)."""
    return _ORIGIN.fullmatch(origin) is not None


def parse_operating_points(values: list[str]) -> dict[str, str]:
    """``meddx serve --operating-point`` values → ``ServeSettings.operating_points``.

    ``NAME`` applies to every served model that has operating points; ``MODEL=NAME`` to the
    model whose card is named ``MODEL`` (and wins over a bare ``NAME``).

    Raises:
        ConfigError: an empty name, or the same model given twice.
    """
    out: dict[str, str] = {}
    for value in values:
        model, sep, name = value.partition("=")
        key, name = (model.strip(), name.strip()) if sep else (ALL_MODELS, model.strip())
        if not key or not name:
            raise ConfigError(f"--operating-point {value!r}: give NAME or MODEL=NAME",
                              hint="e.g. --operating-point balanced, or icu=sensitivity@0.8")
        if key in out:
            raise ConfigError(f"--operating-point given twice for "
                              f"{'all models' if key == ALL_MODELS else repr(key)}")
        out[key] = name
    return out


def load_api_keys(path: str | Path) -> dict[str, str]:
    """Read an API key file ``{"keys": [{"id": …, "sha256": …}]}`` → ``{id: sha256}``.

    Only hashes are stored; ``meddx keys api-key`` writes them.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        keys = {str(k["id"]): str(k["sha256"]).lower() for k in data["keys"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("cannot read the API key file", path=str(p),
                          hint='expected {"keys": [{"id": …, "sha256": …}]}') from e
    for kid, digest in keys.items():
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"API key {kid!r} is not a sha256 hex digest", path=str(p))
    return keys


def load_trust(path: str | Path, issuer: str | None = None) -> list[IssuerTrust]:
    """Read a trust file: either ``{"issuers": [IssuerTrust, …]}`` or a plain JWKS.

    A plain JWKS needs ``issuer`` (``meddx serve --cds-issuer``) to say whose keys they are.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("cannot read the JWKS / trust file", path=str(p)) from e
    if isinstance(data, dict) and "issuers" in data:
        try:
            return [IssuerTrust.model_validate(x) for x in data["issuers"]]
        except ValueError as e:
            raise ConfigError(f"invalid trust file: {e}", path=str(p)) from e
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        if not issuer:
            raise ConfigError("a plain JWKS file needs the issuer it belongs to", path=str(p),
                              hint="add --cds-issuer https://ehr.example.org")
        return [IssuerTrust(iss=issuer, jwks=data)]
    raise ConfigError("file is neither a JWKS nor a trust file", path=str(p))
