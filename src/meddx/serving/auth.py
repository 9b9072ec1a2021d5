"""Who may call the service: CDS Hooks JWTs (to the 2.0 spec) and hashed API keys.

JWT checks, in order; any failure is an :class:`~meddx.errors.AuthError` whose reason is logged
on the server and never shown to the caller (the caller only sees ``401``):

1. header ``alg`` in the allow-list (ES384/RS384, ES256/RS256 — never ``none`` or HMAC),
   ``kid`` and ``typ: JWT`` present;
2. ``iss`` is an allow-listed issuer; its keys come from a local JWKS or, when the header
   names a ``jku``, from that URL only if it is on the issuer's ``jku`` allow-list;
3. the signature verifies with the key named by ``kid`` (joserfc);
4. ``aud`` (string or array) contains the exact URL of the endpoint called, built from the
   configured public base URL;
5. ``exp`` in the future, ``iat`` present, not in the future and not older than the window;
6. ``jti`` present and never seen before (replay cache, kept until the token could no longer
   be accepted anyway).

API keys are random tokens ``mdx_<id>_<secret>``; only their sha256 is stored in the settings.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from meddx.errors import AuthError, ConfigError
from meddx.serving.settings import IssuerTrust, ServeSettings
from meddx.serving.state import ReplayCache, StateStore

__all__ = [
    "Caller",
    "ReplayCache",
    "StoreReplay",
    "JWTVerifier",
    "Authenticator",
    "hash_api_key",
    "new_api_key",
    "ANONYMOUS",
]

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "mdx_"
_PUBLIC_ONLY = {"kty", "kid", "use", "alg", "key_ops", "crv", "x", "y", "n", "e"}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, as named in the audit log (never a patient)."""

    kind: str  # "jwt" | "api-key" | "anonymous"
    id: str  # API key id, or the JWT issuer
    sub: str | None = None

    def audit(self) -> dict[str, str | None]:
        if self.kind == "jwt":
            return {"kind": "jwt", "iss": self.id, "sub": self.sub}
        return {"kind": self.kind, "key_id": self.id}


ANONYMOUS = Caller(kind="anonymous", id="insecure-no-auth")


def hash_api_key(token: str) -> str:
    """sha256 hex of an API key, as stored in the key file."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_key(key_id: str) -> tuple[str, str]:
    """A fresh API key for ``key_id``: ``(token shown once, sha256 to store)``."""
    if not key_id or any(c.isspace() for c in key_id):
        raise ConfigError("an API key id must be a non-empty word")
    token = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return token, hash_api_key(token)


class StoreReplay:
    """The replay cache kept in a shared :class:`~meddx.serving.state.StateStore` (every
    replica naming the same store refuses a ``jti`` any of them has seen)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def add(self, iss: str, jti: str, expires: float, now: float | None = None) -> bool:
        """Record a token id; False when any replica saw it before."""
        now = time.time() if now is None else now
        digest = hashlib.sha256(f"{iss}\x00{jti}".encode()).hexdigest()
        return self.store.claim(f"jti:{digest}", max(expires - now, 1.0))


def _b64json(part: str) -> dict[str, Any]:
    padded = part + "=" * (-len(part) % 4)
    value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _public_keyset(jwks: dict[str, Any]) -> KeySet:
    """Import only public parameters (a JWKS holding private ``d`` must not sign for us)."""
    keys = [{k: v for k, v in key.items() if k in _PUBLIC_ONLY} for key in jwks.get("keys", [])]
    return KeySet.import_key_set({"keys": keys})


class JWTVerifier:
    """Verifies JWTs from allow-listed issuers (see the module docstring for the checks).

    Args:
        settings: issuers, algorithms, windows, replay cache size.
        fetch: ``fetch(url, timeout) -> dict`` for allow-listed ``jku`` URLs (default httpx).
        now: clock (for tests).
        store: a shared state store for the replay cache (``meddx serve --state``); None
            keeps it in this process's memory.
    """

    def __init__(self, settings: ServeSettings,
                 fetch: Callable[[str, float], dict[str, Any]] | None = None,
                 now: Callable[[], float] = time.time,
                 store: StateStore | None = None) -> None:
        self.settings = settings
        self.now = now
        self.replay: ReplayCache | StoreReplay = (
            StoreReplay(store) if store is not None and store.shared
            else ReplayCache(settings.replay_cache_size))
        self._fetch = fetch or _http_fetch
        self._issuers: dict[str, IssuerTrust] = {t.iss: t for t in settings.issuers}
        self._local: dict[str, KeySet] = {}
        self._remote: dict[str, tuple[float, KeySet]] = {}
        self._lock = threading.Lock()
        for trust in settings.issuers:
            if trust.jwks is not None or trust.jwks_file is not None:
                self._local[trust.iss] = self._load_local(trust)

    @property
    def enabled(self) -> bool:
        return bool(self._issuers)

    @staticmethod
    def _load_local(trust: IssuerTrust) -> KeySet:
        data = trust.jwks
        if data is None:
            path = Path(trust.jwks_file)  # type: ignore[arg-type]
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError("cannot read JWKS file", path=str(path)) from e
        try:
            return _public_keyset(data)
        except (JoseError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"invalid JWKS for issuer {trust.iss!r}: {e}") from e

    # ------------------------------------------------------------------ verify
    def verify(self, token: str, audiences: Sequence[str]) -> Caller:
        """Check ``token`` for a call to one of ``audiences`` (exact endpoint URLs).

        Raises:
            AuthError: any check failed (the reason is logged, not returned).
        """
        try:
            header, claims = self._peek(token)
            trust = self._issuers.get(claims.get("iss"))  # type: ignore[arg-type]
            if trust is None:
                raise AuthError("issuer is not allow-listed")
            key = self._key_for(trust, header)
            try:
                verified = jwt.decode(token, key, algorithms=[header["alg"]]).claims
            except (JoseError, ValueError) as e:
                raise AuthError("signature does not verify") from e
            self._check_claims(verified, trust.iss, audiences)
        except AuthError as e:
            logger.warning("JWT rejected: %s", e.message)
            raise
        return Caller(kind="jwt", id=trust.iss, sub=verified.get("sub"))

    def _peek(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("not a compact JWS")
        try:
            header, claims = _b64json(parts[0]), _b64json(parts[1])
        except (ValueError, UnicodeDecodeError) as e:
            raise AuthError("header or payload is not base64url JSON") from e
        if header.get("alg") not in self.settings.algorithms:
            raise AuthError(f"alg {header.get('alg')!r} is not allowed")
        if not isinstance(header.get("kid"), str) or not header["kid"]:
            raise AuthError("kid missing")
        if not isinstance(header.get("typ"), str) or header["typ"].upper() != "JWT":
            raise AuthError("typ missing or not JWT")
        if "crit" in header:
            raise AuthError("crit header not supported")
        return header, claims

    def _key_for(self, trust: IssuerTrust, header: dict[str, Any]) -> Any:
        kid = header["kid"]
        jku = header.get("jku")
        if jku is not None:
            if jku not in trust.jku_allow:
                raise AuthError("jku is not allow-listed")
            keys = self._remote_keys(jku)
        else:
            keys = self._local.get(trust.iss)
            if keys is None:
                raise AuthError("issuer has no local JWKS and token names no jku")
        try:
            return keys.get_by_kid(kid)
        except (ValueError, KeyError, JoseError) as e:
            raise AuthError("unknown kid") from e

    def _remote_keys(self, url: str) -> KeySet:
        with self._lock:
            cached = self._remote.get(url)
        if cached and cached[0] > self.now():
            return cached[1]
        try:
            keys = _public_keyset(self._fetch(url, self.settings.jku_timeout_s))
        except Exception as e:  # noqa: BLE001 — any fetch/parse failure is an auth failure
            raise AuthError("jku could not be fetched") from e
        with self._lock:
            self._remote[url] = (self.now() + self.settings.jku_cache_s, keys)
        return keys

    def _check_claims(self, claims: dict[str, Any], iss: str, audiences: Sequence[str]) -> None:
        now = self.now()
        skew = self.settings.clock_skew_s
        registry = jwt.JWTClaimsRegistry(
            now=int(now), leeway=skew,
            iss={"essential": True, "value": iss},
            aud={"essential": True, "values": list(audiences)},
            exp={"essential": True}, iat={"essential": True}, jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as e:
            raise AuthError(f"claims invalid: {e}") from e
        iat = float(claims["iat"])
        if iat > now + skew:
            raise AuthError("iat in the future")
        if now - iat > self.settings.iat_window_s:
            raise AuthError("iat older than the accepted window")
        keep_until = max(float(claims["exp"]), iat + self.settings.iat_window_s) + skew
        if not self.replay.add(iss, str(claims["jti"]), keep_until, now=now):
            raise AuthError("jti replayed")


def _http_fetch(url: str, timeout: float) -> dict[str, Any]:
    import httpx

    r = httpx.get(url, timeout=timeout, follow_redirects=False)
    r.raise_for_status()
    return r.json()


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Caller`, or raises AuthError.

    Args:
        settings: service settings (API key hashes, issuers, ``insecure_no_auth``).
        verifier: a :class:`JWTVerifier` (built from the settings when omitted).
    """

    def __init__(self, settings: ServeSettings, verifier: JWTVerifier | None = None) -> None:
        self.settings = settings
        self.jwt = verifier or JWTVerifier(settings)
        self._keys = [(kid, bytes.fromhex(h)) for kid, h in settings.api_keys.items()]

    def authenticate(self, authorization: str | None, audiences: Sequence[str],
                     allow_api_key: bool = True) -> Caller:
        """Check a bearer token for a call whose exact URL(s) are ``audiences``."""
        if self.settings.insecure_no_auth:
            return ANONYMOUS
        if not authorization:
            raise AuthError("no Authorization header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("not a bearer token")
        if token.startswith(API_KEY_PREFIX):
            if not allow_api_key:
                raise AuthError("API keys are not accepted here")
            return self._api_key(token)
        if not self.jwt.enabled:
            raise AuthError("no JWT issuers configured")
        return self.jwt.verify(token, audiences)

    def _api_key(self, token: str) -> Caller:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for kid, stored in self._keys:  # compare all, constant time each
            if hmac.compare_digest(digest, stored):
                found = kid
        if found is None:
            logger.warning("API key rejected")
            raise AuthError("unknown API key")
        return Caller(kind="api-key", id=found)
