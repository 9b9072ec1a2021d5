"""``meddx keys`` and ``meddx serve`` (the real command, in a subprocess on loopback)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.serving.auth import JWTVerifier, hash_api_key
from meddx.serving.settings import ServeSettings, load_api_keys, load_trust
from serving_support import get_package

runner = CliRunner()


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


def test_keys_api_key_stores_only_the_hash(tmp_path):
    f = tmp_path / "keys.json"
    r = runner.invoke(app, ["keys", "api-key", "ward-7", "--file", str(f)])
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    assert token.startswith("mdx_ward-7_")
    assert load_api_keys(f) == {"ward-7": hash_api_key(token)}
    assert token not in f.read_text()
    again = runner.invoke(app, ["keys", "api-key", "ward-7", "--file", str(f)])
    assert again.exit_code != 0


def test_keys_ehr_and_token_verify(tmp_path):
    r = runner.invoke(app, ["keys", "ehr", "--out", str(tmp_path), "--kid", "k1"])
    assert r.exit_code == 0, r.output
    jwks = json.loads((tmp_path / "ehr-jwks.json").read_text())
    assert "d" not in jwks["keys"][0]  # the public file holds no private part
    assert (tmp_path / "ehr-private.jwk.json").stat().st_mode & 0o077 == 0
    aud = "https://meddx.test/cds-services/m"
    r = runner.invoke(app, ["keys", "token", "--key", str(tmp_path / "ehr-private.jwk.json"),
                            "--iss", "https://ehr.test", "--aud", aud])
    assert r.exit_code == 0, r.output
    trust = load_trust(tmp_path / "ehr-jwks.json", "https://ehr.test")
    caller = JWTVerifier(ServeSettings(issuers=tuple(trust))).verify(r.output.strip(), [aud])
    assert caller.id == "https://ehr.test"


def test_serve_refuses_no_auth_off_loopback(package):
    r = runner.invoke(app, ["serve", str(package.path), "--insecure-no-auth",
                            "--host", "0.0.0.0"])
    assert r.exit_code != 0


def test_serve_builds_the_app_from_its_options(package, tmp_path, monkeypatch):
    """``meddx serve`` maps its flags to ServeSettings and hands the app to uvicorn (patched
    here; the real uvicorn server is exercised by the live-server tests)."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    keys = tmp_path / "api-keys.json"
    runner.invoke(app, ["keys", "api-key", "cli", "--file", str(keys)])
    runner.invoke(app, ["keys", "ehr", "--out", str(tmp_path)])
    r = runner.invoke(app, [
        "serve", str(package.path), "--port", "8123", "--api-key-file", str(keys),
        "--cds-jwks", str(tmp_path / "ehr-jwks.json"), "--cds-issuer", "https://ehr.test",
        "--public-url", "https://meddx.example.org/", "--research-use", "--max-body-mb", "5",
        "--max-in-flight", "12", "--audit-log", str(tmp_path / "audit.jsonl")])
    assert r.exit_code == 0, r.output
    st = seen["app"].state.meddx.settings
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert st.public_url == "https://meddx.example.org" and st.max_in_flight == 12
    assert st.max_body_bytes == 5 * 1024 * 1024 and "cli" in st.api_keys
    assert st.issuers[0].iss == "https://ehr.test"
    assert seen["limit_concurrency"] >= st.max_in_flight
    assert list(seen["app"].state.meddx.hub.models) == [package.card.name]
