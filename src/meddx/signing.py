"""Signed model packages: an Ed25519 signature over the exact bytes of ``manifest.json``.

The manifest holds the sha256 of every other file of a package, so a valid signature over it,
together with a check of every file against it, covers the whole package. The signature lives
beside the manifest in ``manifest.sig`` (never listed in the manifest)::

    {"algorithm": "Ed25519", "signature": "<base64>", "key_sha256": "<hex>",
     "manifest_sha256": "<hex>"}

``key_sha256`` is the sha256 of the raw 32-byte public key (its fingerprint). Keys are PEM files:
``meddx keys sign-key --out keys`` writes ``meddx-signing.key`` (private, mode 600) and
``meddx-signing.pub``; ``meddx sign MODEL --key keys/meddx-signing.key`` signs;
``meddx serve … --trust-key keys/meddx-signing.pub`` serves only packages signed by that key.

This module is core: it needs only :mod:`meddx.errors` and ``cryptography`` (imported lazily,
part of the ``serve`` extra).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, ModelError

__all__ = [
    "SIGNATURE",
    "generate_key_pair",
    "load_private_key",
    "load_public_key",
    "key_fingerprint",
    "sign_package",
    "verify_package",
    "member_name_ok",
    "check_package_files",
    "write_manifest",
    "sha256_file",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ALGORITHM = "Ed25519"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError as e:  # pragma: no cover - the serve extra brings it
        raise ConfigError("package signing needs the `cryptography` library",
                          hint="pip install 'meddx[serve]'") from e
    return serialization, ed25519


def key_fingerprint(public_key: Any) -> str:
    """Hex sha256 of the raw 32-byte Ed25519 public key."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key_pair(out: str | Path, name: str = "meddx-signing") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM: ``<name>.key`` (private, mode 600) and ``<name>.pub``.

    Returns:
        (private key path, public key path).

    Raises:
        ConfigError: a key file of that name exists already (never overwritten).
    """
    serialization, ed25519 = _crypto()
    folder = Path(out)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise ConfigError("key file exists already; it is never overwritten", path=str(p),
                              hint="choose another --out or --name")
    folder.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: str | Path) -> Any:
    """Read a PEM Ed25519 private key.

    Raises:
        ConfigError: unreadable, not PEM, or not an Ed25519 private key.
    """
    serialization, ed25519 = _crypto()
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("cannot read the signing key (an unencrypted PEM Ed25519 private "
                          "key is expected)", path=str(p),
                          hint="make one with `meddx keys sign-key --out keys`") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError("the signing key is not an Ed25519 key", path=str(p))
    return key


def load_public_key(path: str | Path) -> Any:
    """Read a PEM Ed25519 public key (``meddx keys sign-key`` writes ``*.pub``).

    Raises:
        ConfigError: unreadable, not PEM, or not an Ed25519 public key.
    """
    serialization, ed25519 = _crypto()
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("cannot read the trusted public key (a PEM Ed25519 public key is "
                          "expected)", path=str(p),
                          hint="give the .pub file written by `meddx keys sign-key`") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError("the trusted key is not an Ed25519 public key", path=str(p))
    return key


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def member_name_ok(name: str) -> bool:
    """Whether a manifest entry names a file inside the package: a relative POSIX path
    (``weights.safetensors``, ``encoder/weights.safetensors``), never absolute, never ``..``."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and not name.startswith("/") and all(
        p not in ("", ".", "..") for p in parts)


def check_package_files(path: str | Path) -> None:
    """Check every file listed in a package's manifest, sub-folders included, against its
    sha256 (no signature check).

    Raises:
        ModelError: no package or manifest, a listed file missing or changed.
    """
    root = Path(path)
    _check_files(root, _read_manifest(root))


def _member_files(root: Path) -> list[str]:
    """Every file of a package folder but the manifest and its signature, sub-folders included
    (relative POSIX names); hidden files and folders are never part of a package."""
    names = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) \
                and rel.as_posix() not in (MANIFEST, SIGNATURE, MANIFEST + ".tmp"):
            names.append(rel.as_posix())
    return sorted(names)


def write_manifest(path: str | Path) -> dict[str, str]:
    """(Re)write a package's ``manifest.json``: the sha256 of every file it holds. A signature
    made before no longer matches (the package must be signed again).

    Returns:
        the manifest written.
    """
    root = Path(path)
    manifest = {name: sha256_file(root / name) for name in _member_files(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / MANIFEST)
    return manifest


def _check_files(root: Path, manifest_bytes: bytes) -> None:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as e:
        raise ModelError("manifest.json is not valid JSON", path=str(root / MANIFEST)) from e
    if not isinstance(manifest, dict):
        raise ModelError("manifest.json is not a mapping of file to sha256", path=str(root))
    for name, digest in manifest.items():
        f = root / name
        if not member_name_ok(str(name)) or not f.is_file():
            raise ModelError(f"package file {name} is missing", package=str(root))
        if sha256_file(f) != digest:
            raise ModelError(f"package file {name} was changed (sha256 mismatch)",
                             package=str(root),
                             hint="restore the original file, or rebuild and re-sign the package")


def _read_manifest(root: Path) -> bytes:
    if not root.is_dir():
        raise ModelError(f"no model package at {root}", package=str(root))
    try:
        return (root / MANIFEST).read_bytes()
    except OSError as e:
        raise ModelError("package has no manifest.json", package=str(root)) from e


def sign_package(path: str | Path, private_key: str | Path | Any) -> dict[str, str]:
    """Check every file of the package against its manifest, then sign the manifest.

    Args:
        path: the package folder.
        private_key: a PEM key file or a loaded ``Ed25519PrivateKey``.

    Returns:
        what was written to ``manifest.sig``.

    Raises:
        ModelError: the package is missing or does not match its manifest (it is not signed).
        ConfigError: the key cannot be read.
    """
    root = Path(path)
    key = load_private_key(private_key) if isinstance(private_key, str | Path) else private_key
    manifest = _read_manifest(root)
    _check_files(root, manifest)
    record = {"algorithm": ALGORITHM,
              "signature": base64.b64encode(key.sign(manifest)).decode("ascii"),
              "key_sha256": key_fingerprint(key.public_key()),
              "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    tmp = root / (SIGNATURE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(root / SIGNATURE)
    return record


def verify_package(path: str | Path, trusted_public_keys: Iterable[str | Path | Any]) -> str:
    """Check that a package is signed by one of ``trusted_public_keys`` and unchanged since.

    Args:
        path: the package folder.
        trusted_public_keys: PEM public key files or loaded ``Ed25519PublicKey`` objects.

    Returns:
        the fingerprint (hex sha256) of the key that signed it.

    Raises:
        ModelError: naming the package and why: unsigned; signed by an untrusted key; the
            signature does not match (manifest changed after signing); a file changed.
        ConfigError: a trusted key cannot be read, or none was given.
    """
    _crypto()
    from cryptography.exceptions import InvalidSignature

    root = Path(path)
    keys = {key_fingerprint(k): k for k in (
        load_public_key(k) if isinstance(k, str | Path) else k for k in trusted_public_keys)}
    if not keys:
        raise ConfigError("no trusted public key to verify packages with")
    manifest = _read_manifest(root)
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise ModelError("package is not signed (no manifest.sig)", package=str(root),
                         hint="sign it with `meddx sign PACKAGE --key KEY`, or serve it without "
                              "--trust-key")
    try:
        record = json.loads(sig_path.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
        fingerprint = str(record["key_sha256"])
        if record.get("algorithm", ALGORITHM) != ALGORITHM:
            raise ValueError(f"algorithm {record.get('algorithm')!r}")
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise ModelError(f"manifest.sig is unreadable ({e})", package=str(root),
                         hint="re-sign the package with `meddx sign`") from e
    if fingerprint not in keys:
        raise ModelError(f"package is signed by an untrusted key (sha256 {fingerprint[:16]}…)",
                         package=str(root),
                         hint="re-sign it with a trusted key, or add that key's .pub with "
                              "--trust-key if you trust it")
    try:
        keys[fingerprint].verify(signature, manifest)
    except InvalidSignature as e:
        raise ModelError("package signature does not match: manifest.json was changed after "
                         "signing", package=str(root),
                         hint="restore the signed package, or check the change and re-sign "
                              "it") from e
    _check_files(root, manifest)
    return fingerprint
