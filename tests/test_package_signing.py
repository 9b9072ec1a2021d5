"""Signed packages (issue 16, point 6): ``meddx sign`` writes an Ed25519 signature over the
manifest; ``load_package(trust=…)`` and ``meddx serve --trust-key`` refuse unsigned,
other-signed and changed packages, and load a valid one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import ConfigError, ModelError
from meddx.package import load_package
from meddx.signing import SIGNATURE, fingerprint, load_public_key, new_signing_key, sign_package

runner = CliRunner()


@pytest.fixture
def pkg(tiny_sequence_package, tmp_path) -> Path:
    """A fresh copy of an (untrained) package that a test may sign and change."""
    return Path(shutil.copytree(tiny_sequence_package.path, tmp_path / "model"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {n: new_signing_key(folder, n) for n in ("hospital", "other")}


def test_cli_signs_and_the_signed_package_loads(pkg, tmp_path):
    r = runner.invoke(app, ["keys", "signing-key", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    private, public = tmp_path / "k/package-signing.pem", tmp_path / "k/package-signing.pub.pem"
    assert private.stat().st_mode & 0o077 == 0 and b"PRIVATE" not in public.read_bytes()
    r = runner.invoke(app, ["sign", str(pkg), "--key", str(private)])
    assert r.exit_code == 0, r.output
    loaded = load_package(pkg, trust=[public])
    assert loaded.signer == fingerprint(load_public_key(public))
    assert SIGNATURE not in loaded.manifest  # it signs the manifest, so it is not listed in it
    record = json.loads((pkg / SIGNATURE).read_text())
    assert record["algorithm"] == "Ed25519" and record["key"] == loaded.signer


def test_unsigned_package_is_refused_when_trust_is_asked(pkg, keys):
    with pytest.raises(ModelError, match="is not signed") as e:
        load_package(pkg, trust=[keys["hospital"][1]])
    assert "meddx sign" in e.value.hint
    assert load_package(pkg).signer is None  # without trust, loading is as before


def test_package_signed_by_another_key_is_refused(pkg, keys):
    sign_package(pkg, keys["other"][0])
    with pytest.raises(ModelError, match="not a trusted key"):
        load_package(pkg, trust=[keys["hospital"][1]])
    both = load_package(pkg, trust=[keys["hospital"][1], keys["other"][1]])
    assert both.signer == fingerprint(load_public_key(keys["other"][1]))


def test_card_changed_after_signing_is_refused(pkg, keys):
    """Whoever edits the card and rewrites the manifest to match passes the sha256 checks;
    only the signature catches it."""
    sign_package(pkg, keys["hospital"][0])
    load_package(pkg).update_card(intended_use="Diagnosis of everything.")  # card + manifest
    assert load_package(pkg).card.intended_use == "Diagnosis of everything."
    with pytest.raises(ModelError, match="does not match its signature"):
        load_package(pkg, trust=[keys["hospital"][1]])


def test_card_edited_alone_fails_its_sha256(pkg, keys):
    sign_package(pkg, keys["hospital"][0])
    card = pkg / "card.json"
    card.write_text(card.read_text().replace("Research", "Clinical"))
    with pytest.raises(ModelError, match="card.json was changed"):
        load_package(pkg, trust=[keys["hospital"][1]])


def test_a_changed_package_is_never_signed(pkg, keys):
    (pkg / "card.json").write_text((pkg / "card.json").read_text() + " ")
    with pytest.raises(ModelError, match="was changed"):
        sign_package(pkg, keys["hospital"][0])
    assert not (pkg / SIGNATURE).exists()


def test_key_files_are_checked(keys, tmp_path):
    with pytest.raises(ConfigError, match="private key"):
        load_public_key(keys["hospital"][0])  # --trust-key given the secret half
    with pytest.raises(ConfigError, match="not a usable private key"):
        sign_package(tmp_path, keys["hospital"][1])  # --key given the public half
    with pytest.raises(ConfigError, match="exists already"):
        new_signing_key(keys["hospital"][0].parent, "hospital")


def test_serve_trust_key_starts_with_a_signed_package(pkg, keys, tmp_path, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    sign_package(pkg, keys["hospital"][0])
    r = runner.invoke(app, ["serve", str(pkg), "--insecure-no-auth", "--research-use",
                            "--trust-key", str(keys["hospital"][1]),
                            "--audit-log", str(tmp_path / "audit.jsonl")])
    assert r.exit_code == 0, r.output
    hub = seen["app"].state.meddx.hub
    assert [m.predictor.package.signer for m in hub.models.values()] == [
        fingerprint(load_public_key(keys["hospital"][1]))]


@pytest.mark.parametrize("case", ["unsigned", "other-signed"])
def test_serve_trust_key_refuses_to_start(case, pkg, keys, tmp_path):
    """The real command: exit code 2 and a message naming the package and what to do."""
    if case == "other-signed":
        sign_package(pkg, keys["other"][0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "meddx.cli", "serve", str(pkg),
                        "--insecure-no-auth", "--research-use", "--no-cds-explain",
                        "--trust-key", str(keys["hospital"][1]),
                        "--audit-log", str(tmp_path / "audit.jsonl")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    err = " ".join(p.stderr.split())
    assert str(pkg) in err or pkg.name in err
    assert ("is not signed" in err and "meddx sign" in err) if case == "unsigned" else (
        "not a trusted key" in err and "--trust-key" in err)


def test_encrypted_signing_key_needs_its_passphrase(pkg, keys, tmp_path, monkeypatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "enc.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"s3cret")))
    monkeypatch.delenv("MEDDX_SIGNING_KEY_PASSPHRASE", raising=False)
    with pytest.raises(ConfigError, match="encrypted"):
        sign_package(pkg, path)
    monkeypatch.setenv("MEDDX_SIGNING_KEY_PASSPHRASE", "s3cret")
    sign_package(pkg, path)
    assert load_package(pkg, trust=[key.public_key()]).signer == fingerprint(key.public_key())
