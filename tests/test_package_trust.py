"""``load_package(path, trust=[public keys])``: the signature check at load time that callers
in Python ask for (``meddx serve --trust-key`` does the same through meddx.signing)."""

from __future__ import annotations

import shutil

import pytest

from meddx.errors import ConfigError, ModelError
from meddx.package import load_package
from meddx.signing import generate_key_pair, key_fingerprint, load_public_key, sign_package


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trust_keys")
    return generate_key_pair(folder, "ours"), generate_key_pair(folder, "theirs")


@pytest.fixture
def package(tiny_sequence_package, tmp_path):
    return shutil.copytree(tiny_sequence_package.path, tmp_path / "model")


def test_signed_package_loads_and_names_its_signer(package, keys):
    (ours_key, ours_pub), (_, theirs_pub) = keys
    sign_package(package, ours_key)
    loaded = load_package(package, trust=[theirs_pub, ours_pub])  # any one trusted key
    assert loaded.signer == key_fingerprint(load_public_key(ours_pub))
    assert load_package(package).signer is None  # without trust: no check, as before


def test_unsigned_and_other_signed_packages_do_not_load(package, keys):
    (ours_key, ours_pub), (theirs_key, _) = keys
    with pytest.raises(ModelError, match="not signed"):
        load_package(package, trust=[ours_pub])
    sign_package(package, theirs_key)
    with pytest.raises(ModelError, match="untrusted key"):
        load_package(package, trust=[ours_pub])


def test_card_changed_after_signing_does_not_load(package, keys):
    """The card edited and the manifest rewritten to match pass the sha256 checks; the
    signature does not."""
    (ours_key, ours_pub), _ = keys
    sign_package(package, ours_key)
    load_package(package).update_card(intended_use="Diagnosis of everything.")
    assert load_package(package).card.intended_use == "Diagnosis of everything."
    with pytest.raises(ModelError, match="changed after signing"):
        load_package(package, trust=[ours_pub])


def test_trust_asked_with_no_key_is_an_error(package):
    with pytest.raises(ConfigError, match="no trusted public key"):
        load_package(package, trust=[])
