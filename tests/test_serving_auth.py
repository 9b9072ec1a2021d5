"""JWT matrix (CDS Hooks 2.0 security) and API keys, through the real app."""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey

from meddx.errors import AuthError
from meddx.serving.app import create_app
from meddx.serving.auth import JWTVerifier, ReplayCache, hash_api_key, new_api_key
from meddx.serving.settings import IssuerTrust, ServeSettings
from serving_support import (
    ISS,
    PUBLIC,
    Keys,
    get_package,
    hs256_with_public_key,
    token,
    unsigned_token,
)

SERVICE = "breast-tiny"
FEEDBACK_URL = f"{PUBLIC}/cds-services/{SERVICE}/feedback"
SERVICE_URL = f"{PUBLIC}/cds-services/{SERVICE}"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def jku_server():
    """A loopback HTTP server publishing a second JWKS (for the allow-listed jku case)."""
    remote = ECKey.generate_key("P-384", parameters={"kid": "remote-1"}, private=True)
    body = json.dumps({"keys": [remote.as_dict(private=False)]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield remote, f"http://127.0.0.1:{srv.server_address[1]}/jwks.json"
    srv.shutdown()


@pytest.fixture(scope="module")
def api_key() -> tuple[str, str]:
    return new_api_key("clinic-a")


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


@pytest.fixture(scope="module")
def client(package, keys, jku_server, api_key, tmp_path_factory):
    _, jku = jku_server
    tmp = tmp_path_factory.mktemp("auth")
    settings = ServeSettings(
        public_url=PUBLIC, research_use=True, warmup=False,
        issuers=(IssuerTrust(iss=ISS, jwks=keys.jwks(), jku_allow=(jku,)),),
        api_keys={"clinic-a": api_key[1]}, audit_log=tmp / "audit.jsonl")
    with TestClient(create_app([package.path], settings)) as c:
        yield c


def feedback_body() -> dict:
    return {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted",
                          "acceptedSuggestions": [], "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}


def send(client: TestClient, tok: str | None, url: str = FEEDBACK_URL):
    headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
    return client.post(url.replace(PUBLIC, ""), json=feedback_body(), headers=headers)


def assert_401(r) -> None:
    assert r.status_code == 401
    assert r.json()["message"] == "authentication required"  # never which check failed
    assert r.headers["www-authenticate"] == "Bearer"


# ----------------------------------------------------------------- accepted
def test_valid_es384_accepted(client, keys):
    assert send(client, token(keys.ec, FEEDBACK_URL, "ES384")).status_code == 200


def test_valid_rs384_accepted(client, keys):
    assert send(client, token(keys.rsa, FEEDBACK_URL, "RS384")).status_code == 200


def test_es256_and_rs256_accepted(client, keys):
    assert send(client, token(keys.ec256, FEEDBACK_URL, "ES256")).status_code == 200
    assert send(client, token(keys.rsa, FEEDBACK_URL, "RS256")).status_code == 200


def test_aud_in_array_accepted(client, keys):
    tok = token(keys.ec, ["https://other.test", FEEDBACK_URL])
    assert send(client, tok).status_code == 200


def test_allow_listed_jku_accepted(client, jku_server):
    remote, jku = jku_server
    tok = token(remote, FEEDBACK_URL, header={"jku": jku})
    assert send(client, tok).status_code == 200


# ----------------------------------------------------------------- rejected
def test_alg_none_rejected(client):
    assert_401(send(client, unsigned_token(FEEDBACK_URL)))


def test_hs256_with_public_key_as_secret_rejected(client, keys):
    assert_401(send(client, hs256_with_public_key(keys, FEEDBACK_URL)))


def test_expired_rejected(client, keys):
    now = int(time.time())
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, exp=now - 120, iat=now - 200)))


def test_missing_exp_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, exp=None)))


def test_wrong_aud_rejected(client, keys):
    assert_401(send(client, token(keys.ec, f"{PUBLIC}/cds-services/other-service")))


def test_aud_of_another_host_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL.replace(PUBLIC, "https://evil.test"))))


def test_unknown_iss_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, iss="https://unknown-ehr.test")))


def test_unknown_kid_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, header={"kid": "nope"})))


def test_missing_kid_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, header={"kid": None})))


def test_missing_typ_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, header={"typ": None})))


def test_jku_not_allow_listed_rejected(client, keys):
    tok = token(keys.ec, FEEDBACK_URL, header={"jku": "https://evil.test/jwks.json"})
    assert_401(send(client, tok))


def test_replayed_jti_rejected(client, keys):
    tok = token(keys.ec, FEEDBACK_URL)
    assert send(client, tok).status_code == 200
    assert_401(send(client, tok))


def test_missing_jti_rejected(client, keys):
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, jti=None)))


def test_tampered_signature_rejected(client, keys):
    head, body, sig = token(keys.ec, FEEDBACK_URL).split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert_401(send(client, f"{head}.{body}.{flipped}"))


def test_tampered_payload_rejected(client, keys):
    head, _, sig = token(keys.ec, FEEDBACK_URL).split(".")
    other = token(keys.ec, FEEDBACK_URL, sub="someone-else").split(".")[1]
    assert_401(send(client, f"{head}.{other}.{sig}"))


def test_key_of_another_party_with_same_kid_rejected(client, keys):
    assert_401(send(client, token(keys.other, FEEDBACK_URL)))


def test_iat_too_old_rejected(client, keys):
    now = int(time.time())
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, iat=now - 3600, exp=now + 300)))


def test_iat_in_future_rejected(client, keys):
    now = int(time.time())
    assert_401(send(client, token(keys.ec, FEEDBACK_URL, iat=now + 600, exp=now + 900)))


def test_garbage_token_rejected(client):
    assert_401(send(client, "not.a.jwt"))
    assert_401(send(client, "abc"))


def test_no_token_on_cds_rejected(client):
    assert_401(send(client, None))


def test_api_key_not_accepted_for_cds_calls(client, api_key):
    assert_401(send(client, api_key[0]))


# ---------------------------------------------------------------- REST side
def test_rest_without_token_is_401(client):
    assert_401(client.get("/v1/models"))
    assert_401(client.post(f"/v1/models/{SERVICE}/predict", files={"f": ("a.png", b"x")}))


def test_rest_with_api_key(client, api_key):
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {api_key[0]}"})
    assert r.status_code == 200
    assert r.json()["models"][0]["name"] == SERVICE


def test_rest_with_wrong_api_key(client, api_key):
    assert_401(client.get("/v1/models", headers={"Authorization": f"Bearer {api_key[0]}x"}))
    assert_401(client.get("/v1/models", headers={"Authorization": f"Basic {api_key[0]}"}))


def test_rest_with_jwt_for_the_endpoint(client, keys):
    tok = token(keys.ec, f"{PUBLIC}/v1/models")
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200


def test_health_and_page_need_no_token(client):
    assert client.get("/health/live").status_code == 200
    assert client.get("/").status_code == 200


# ------------------------------------------------------------------- units
def test_api_keys_are_stored_hashed():
    tok, digest = new_api_key("k1")
    assert tok.startswith("mdx_k1_") and digest == hash_api_key(tok) and tok not in digest


def test_replay_cache_bounded_fails_closed():
    cache = ReplayCache(max_size=2)
    now = time.time()
    assert cache.add("i", "a", now + 60, now)
    assert cache.add("i", "b", now + 60, now)
    assert not cache.add("i", "c", now + 60, now)  # full of live entries: refuse
    assert cache.add("i", "d", now + 60, now + 120)  # the old ones expired: room again


def test_hmac_algorithms_cannot_be_configured():
    with pytest.raises(ValueError):
        ServeSettings(algorithms=("HS256",))


def test_private_jwks_parameters_are_dropped(keys):
    private = {"keys": [keys.ec.as_dict(private=True)]}
    v = JWTVerifier(ServeSettings(issuers=(IssuerTrust(iss=ISS, jwks=private),)))
    key = v._local[ISS].get_by_kid("ec-1")
    assert not key.is_private


def test_verifier_reason_not_in_message_to_client(keys):
    v = JWTVerifier(ServeSettings(issuers=(IssuerTrust(iss=ISS, jwks=keys.jwks()),)))
    with pytest.raises(AuthError):
        v.verify(token(keys.ec, "https://x.test/a"), ["https://x.test/b"])


def test_insecure_no_auth_only_on_loopback():
    with pytest.raises(ValueError, match="loopback"):
        ServeSettings(insecure_no_auth=True, host="0.0.0.0")
