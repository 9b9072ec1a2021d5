"""Signed packages: ``meddx sign`` / ``keys sign-key`` and ``meddx serve --trust-key``."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import ConfigError, ModelError
from meddx.package import load_package
from meddx.signing import SIGNATURE, generate_key_pair, sign_package, verify_package

runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signing_keys")
    return generate_key_pair(folder, "ours"), generate_key_pair(folder, "theirs")


@pytest.fixture
def package(tiny_sequence_package, tmp_path):
    """A private copy of the tiny package (tests tamper with it)."""
    return shutil.copytree(tiny_sequence_package.path, tmp_path / "model")


def test_valid_signature_verifies_and_the_package_still_loads(package, keys):
    (ours_key, ours_pub), _ = keys
    record = sign_package(package, ours_key)
    assert verify_package(package, [ours_pub]) == record["key_sha256"]
    assert SIGNATURE not in json.loads((package / "manifest.json").read_text())
    assert load_package(package).card.name == "splice-tiny"
    # rewriting the manifest (e.g. a card update) never lists the signature itself
    load_package(package).update_card(version="1.0.1")
    assert SIGNATURE not in json.loads((package / "manifest.json").read_text())


def test_unsigned_package_is_refused(package, keys):
    (_, ours_pub), _ = keys
    with pytest.raises(ModelError, match="not signed") as e:
        verify_package(package, [ours_pub])
    assert str(package) in str(e.value)


def test_package_signed_by_another_key_is_refused(package, keys):
    (_, ours_pub), (theirs_key, _) = keys
    sign_package(package, theirs_key)
    with pytest.raises(ModelError, match="untrusted key") as e:
        verify_package(package, [ours_pub])
    assert str(package) in str(e.value)


def test_card_changed_after_signing_is_refused(package, keys):
    (ours_key, ours_pub), _ = keys
    sign_package(package, ours_key)
    card = json.loads((package / "card.json").read_text())
    card["intended_use"] = "diagnosis"
    (package / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="card.json was changed"):
        verify_package(package, [ours_pub])


def test_manifest_rewritten_after_signing_is_refused(package, keys):
    """Tamper the card and rewrite the manifest to match: only the signature catches it."""
    (ours_key, ours_pub), _ = keys
    sign_package(package, ours_key)
    load_package(package).update_card(intended_use="diagnosis")
    load_package(package)  # the manifest check alone is satisfied
    with pytest.raises(ModelError, match="manifest.json was changed after signing"):
        verify_package(package, [ours_pub])


def test_forged_signature_file_is_refused(package, keys):
    (ours_key, ours_pub), _ = keys
    sign_package(package, ours_key)
    sig = json.loads((package / SIGNATURE).read_text())
    sig["signature"] = "not base64!"
    (package / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(ModelError, match="unreadable"):
        verify_package(package, [ours_pub])


def test_a_tampered_package_is_never_signed(package, keys):
    (ours_key, _), _ = keys
    (package / "card.json").write_text("{}")
    with pytest.raises(ModelError, match="card.json was changed"):
        sign_package(package, ours_key)
    assert not (package / SIGNATURE).exists()


def test_bad_key_files_are_config_errors(package, tmp_path, keys):
    (ours_key, ours_pub), _ = keys
    with pytest.raises(ConfigError, match="public key"):
        verify_package(package, [ours_key])  # a private key where a public one belongs
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match="signing key"):
        sign_package(package, tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="exists already"):
        generate_key_pair(ours_pub.parent, "ours")


def test_cli_sign_key_and_sign(package, tmp_path):
    r = runner.invoke(app, ["keys", "sign-key", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    private = tmp_path / "k" / "meddx-signing.key"
    assert private.stat().st_mode & 0o077 == 0
    r = runner.invoke(app, ["sign", str(package), "--key", str(private)])
    assert r.exit_code == 0, r.output
    verify_package(package, [tmp_path / "k" / "meddx-signing.pub"])


def _settings(tmp_path, trust):
    from meddx.serving.settings import ServeSettings

    return ServeSettings(insecure_no_auth=True, research_use=True, warmup=False,
                         trust_keys=tuple(trust), audit_log=tmp_path / "audit.jsonl")


def test_create_app_refuses_unsigned_other_signed_and_tampered(package, keys, tmp_path):
    from meddx.serving.app import create_app

    (ours_key, ours_pub), (theirs_key, _) = keys
    with pytest.raises(ModelError, match="not signed"):
        create_app([package], _settings(tmp_path, [ours_pub]))
    sign_package(package, theirs_key)
    with pytest.raises(ModelError, match="untrusted key"):
        create_app([package], _settings(tmp_path, [ours_pub]))
    sign_package(package, ours_key)
    app_ = create_app([package], _settings(tmp_path, [ours_pub]))
    assert list(app_.state.meddx.hub.models) == ["splice-tiny"]
    # two trusted keys: either signer is accepted
    sign_package(package, theirs_key)
    create_app([package], _settings(tmp_path, [ours_pub, keys[1][1]]))
    (package / "weights.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelError, match="weights.safetensors was changed"):
        create_app([package], _settings(tmp_path, [ours_pub, keys[1][1]]))


def test_serve_cli_exits_2_for_an_unsigned_package_and_serves_a_signed_one(
        package, keys, tmp_path, monkeypatch):
    import subprocess
    import sys

    import uvicorn

    (ours_key, ours_pub), _ = keys
    proc = subprocess.run(
        [sys.executable, "-m", "meddx.cli", "serve", str(package), "--insecure-no-auth",
         "--research-use", "--trust-key", str(ours_pub), "--audit-log",
         str(tmp_path / "audit.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not signed" in proc.stderr and "meddx sign" in proc.stderr
    sign_package(package, ours_key)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: seen.update(app=app_))
    r = runner.invoke(app, ["serve", str(package), "--insecure-no-auth", "--research-use",
                            "--trust-key", str(ours_pub), "--audit-log",
                            str(tmp_path / "audit.jsonl")])
    assert r.exit_code == 0, r.output
    assert seen["app"].state.meddx.settings.trust_keys == (ours_pub,)
