"""Ed25519 signatures on model packages.

A package's ``manifest.json`` lists the sha256 of every other file, so one signature over the
manifest's bytes covers the weights, the card and every exported model. ``meddx sign`` writes
it beside the manifest as ``manifest.sig`` (JSON)::

    {"algorithm": "Ed25519", "key": "<sha256 of the signer's raw public key>",
     "signature": "<base64 of the 64-byte signature over manifest.json's bytes>",
     "manifest_sha256": "…", "signed": "2026-12-04T10:00:00+00:00"}

``manifest.sig`` is not listed in the manifest (it signs it). ``load_package(path, trust=[…])``
and ``meddx serve --trust-key PUB`` refuse a package that is unsigned, signed by a key not
trusted, or whose manifest changed after signing; the sha256 checks then cover every file.

Keys are PEM files: a PKCS#8 private key (``meddx keys signing-key`` writes one, mode 0600;
an encrypted one is opened with ``$MEDDX_SIGNING_KEY_PASSPHRASE``) and its SubjectPublicKeyInfo
public key (``*.pub.pem``). ``openssl genpkey -algorithm ed25519 -out k.pem`` and
``openssl pkey -in k.pem -pubout -out k.pub.pem`` make the same pair.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = ["SIGNATURE", "new_signing_key", "load_private_key", "load_public_key",
           "fingerprint", "sign_package", "verify_manifest"]

SIGNATURE = "manifest.sig"
MANIFEST = "manifest.json"
PASSPHRASE_ENV = "MEDDX_SIGNING_KEY_PASSPHRASE"



def fingerprint(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key: how a signature names its signer."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def new_signing_key(out: str | Path, name: str = "package-signing") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``out/NAME.pem`` (private, 0600) and ``NAME.pub.pem``.

    Raises:
        ConfigError: a key of that name exists already (never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(out)
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    for p in (private, public):
        if p.exists():
            raise ConfigError(f"{p} exists already; not overwritten", path=str(p),
                              hint="choose another --name or folder")
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what}", path=str(p)) from e


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key (encrypted: passphrase from ``$MEDDX_SIGNING_KEY_PASSPHRASE``).

    Raises:
        ConfigError: unreadable, not PEM, encrypted without the passphrase, or not Ed25519.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read(path, "signing key")
    secret = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, secret.encode() if secret else None)
    except TypeError as e:
        raise ConfigError("the signing key is encrypted", path=str(path),
                          hint=f"set {PASSPHRASE_ENV} to its passphrase") from e
    except ValueError as e:
        hint = ("this is a public key; signing needs the private key (the .pem without .pub)"
                if b"PUBLIC KEY" in data else "give a PEM file from `meddx keys signing-key`")
        raise ConfigError(f"not a usable private key: {e}", path=str(path), hint=hint) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the signing key is {type(key).__name__}, not Ed25519",
                          path=str(path), hint="make one with `meddx keys signing-key`")
    return key


def load_public_key(key: str | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """A trusted public key: a PEM file (SubjectPublicKeyInfo) or a key object.

    Raises:
        ConfigError: unreadable, a private key, not PEM, or not Ed25519.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    data = _read(key, "trusted public key")
    if b"PRIVATE KEY" in data:
        raise ConfigError("--trust-key was given a private key", path=str(key),
                          hint="give the public half (the .pub.pem file); keep the private key "
                               "off the server")
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise ConfigError(f"not a PEM public key: {e}", path=str(key),
                          hint="give the .pub.pem file from `meddx keys signing-key`") from e
    if not isinstance(public, Ed25519PublicKey):
        raise ConfigError(f"trusted key is {type(public).__name__}, not Ed25519", path=str(key))
    return public


def sign_package(path: str | Path, key: str | Path | Ed25519PrivateKey) -> dict[str, Any]:
    """Verify the package's files, then sign its manifest; writes ``manifest.sig``.

    Returns:
        the signature record written.

    Raises:
        ModelError: not a package, or a file no longer matches the manifest (nothing is
            signed then: a signature must never vouch for a changed package).
        ConfigError: the key cannot be used.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meddx.package import load_package

    root = Path(path)
    private = key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)
    load_package(root)  # every sha256 must hold before we vouch for the manifest
    manifest = (root / MANIFEST).read_bytes()
    record = {"algorithm": "Ed25519", "key": fingerprint(private.public_key()),
              "signature": base64.b64encode(private.sign(manifest)).decode(),
              "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
              "signed": datetime.now(UTC).isoformat(timespec="seconds")}
    tmp = root / (SIGNATURE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(root / SIGNATURE)
    return record


def verify_manifest(root: Path, manifest: bytes,
                    trust: Sequence[str | Path | Ed25519PublicKey]) -> str:
    """Check ``manifest.sig`` against the manifest bytes and the trusted keys.

    Returns:
        the signer's key fingerprint.

    Raises:
        ConfigError: no trusted key given, or one cannot be read.
        ModelError: unsigned, signed by a key not trusted, or the manifest changed after
            signing — each naming the package and what to do.
    """
    from cryptography.exceptions import InvalidSignature

    if not trust:
        raise ConfigError("signature check asked for with no trusted key",
                          hint="give at least one public key (--trust-key PUB)")
    keys = {fingerprint(k): k for k in (load_public_key(t) for t in trust)}
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise ModelError(f"package {root} is not signed (no {SIGNATURE})", path=str(root),
                         hint=f"sign it: meddx sign {root} --key PRIVATE.pem, or serve "
                              "without --trust-key")
    try:
        record = json.loads(sig_path.read_text())
        signer, algorithm = str(record["key"]), record["algorithm"]
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{SIGNATURE} of package {root} is unreadable", path=str(sig_path),
                         hint=f"re-sign it: meddx sign {root} --key PRIVATE.pem") from e
    if algorithm != "Ed25519":
        raise ModelError(f"{SIGNATURE} uses {algorithm!r}; only Ed25519 is accepted",
                         path=str(sig_path))
    if signer not in keys:
        raise ModelError(
            f"package {root} is signed by key {signer[:16]}…, which is not a trusted key "
            f"(trusted: {', '.join(f[:16] + '…' for f in keys)})", path=str(root),
            hint="sign it with a trusted key, or add its signer's public key with --trust-key "
                 "if you trust that signer")
    try:
        keys[signer].verify(signature, manifest)
    except InvalidSignature as e:
        raise ModelError(
            f"manifest.json of package {root} does not match its signature (changed after "
            f"signing by key {signer[:16]}…)", path=str(root / MANIFEST),
            hint=f"restore the package as signed, or review the change and re-sign: "
                 f"meddx sign {root} --key PRIVATE.pem") from e
    return signer
