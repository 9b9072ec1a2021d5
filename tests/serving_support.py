"""Helpers for the serving tests: keys, tokens, images, a real uvicorn server on loopback."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

PUBLIC = "https://meddx.test"
ISS = "https://ehr.test"


class Keys:
    """An EHR's signing keys (EC P-384 and RSA) and its public JWKS."""

    def __init__(self) -> None:
        self.ec = ECKey.generate_key("P-384", parameters={"kid": "ec-1"}, private=True)
        self.ec256 = ECKey.generate_key("P-256", parameters={"kid": "ec-256"}, private=True)
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
        self.other = ECKey.generate_key("P-384", parameters={"kid": "ec-1"}, private=True)

    def jwks(self) -> dict[str, Any]:
        keys = [k.as_dict(private=False) for k in (self.ec, self.ec256, self.rsa)]
        return KeySet.import_key_set({"keys": keys}).as_dict(private=False)


def claims(aud: str | list[str], **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {"iss": ISS, "sub": "ehr-client-1", "aud": aud, "exp": now + 300, "iat": now,
         "jti": str(uuid.uuid4())}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def token(key: Any, aud: str | list[str], alg: str = "ES384", header: dict | None = None,
          **over: Any) -> str:
    """A signed JWT; ``header`` entries override alg/kid/typ (None removes one)."""
    h = {"alg": alg, "kid": key.kid, "typ": "JWT"}
    h.update(header or {})
    h = {k: v for k, v in h.items() if v is not None}
    return jwt.encode(h, claims(aud, **over), key, algorithms=[h["alg"]], default_type=None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(aud: str) -> str:
    """``alg: none`` (no signature)."""
    head = b64url(json.dumps({"alg": "none", "kid": "ec-1", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims(aud)).encode())
    return f"{head}.{body}."


def hs256_with_public_key(keys: Keys, aud: str) -> str:
    """The classic confusion attack: HMAC keyed with the server's public key."""
    secret = json.dumps(keys.ec.as_dict(private=False), sort_keys=True).encode()
    return jwt.encode({"alg": "HS256", "kid": "ec-1", "typ": "JWT"}, claims(aud),
                      OctKey.import_key(secret), algorithms=["HS256"])


def cds_settings(keys: Keys, tmp: Path, **over: Any) -> Any:
    """Service settings for the CDS Hooks tests: public URL, the test EHR as the one trusted
    issuer, research use, no warm-up, audit and feedback logs in ``tmp``; ``over`` adds to
    or replaces any of them."""
    from meddx.serving.settings import IssuerTrust, ServeSettings

    base = {"public_url": PUBLIC, "research_use": True, "warmup": False,
            "issuers": (IssuerTrust(iss=ISS, jwks=keys.jwks()),),
            "audit_log": tmp / "audit.jsonl", "feedback_log": tmp / "feedback.jsonl"}
    return ServeSettings(**{**base, **over})


def breast_png(npz: Path, index: int = 0) -> bytes:
    from PIL import Image

    with np.load(npz) as d:
        img = d["test_images"][index]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares ``width × height`` pixels (IDAT truncated)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def get_package(request: Any) -> Any:
    """The tiny BreastMNIST package shared by the suite (``tiny_breast_package``).

    ``MEDDX_TEST_SERVING_PACKAGE=/path/to/model`` reuses an already trained package instead
    (a developer shortcut when iterating on the serving tests alone).
    """
    import os

    path = os.environ.get("MEDDX_TEST_SERVING_PACKAGE")
    if path:
        from meddx.package import load_package

        return load_package(path)
    return request.getfixturevalue("tiny_breast_package")


class FhirHandler(http.server.BaseHTTPRequestHandler):
    """Base for the tests' loopback FHIR servers: ``reply`` answers JSON, logging is silent."""

    def reply(self, body: dict[str, Any], ok: bool = True) -> None:
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def loopback_fhir(handler: type[FhirHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 in a thread; yields the ``…/fhir`` base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/fhir"
    finally:
        srv.shutdown()
