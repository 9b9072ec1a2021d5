"""The part of the Modality contract the service reads user data through (issue 23, point 10):
content types, hints, JSON inputs and the header look. Parametrised over every registered
modality, so a new one is held to it without a new test."""

from __future__ import annotations

import re

import pytest

from meddx.errors import DataError, UnsupportedMediaTypeError
from meddx.modalities import MODALITIES, get_modality
from meddx.modalities.base import DeclaredSize, Upload
from meddx.serving.inputs import check_upload

NAMES = sorted(MODALITIES.names())
MIME = re.compile(r"^[a-z]+/([a-z0-9.+-]+|\*)$")


@pytest.mark.parametrize("name", NAMES)
def test_declares_its_content_types_and_hints(name: str) -> None:
    m = get_modality(name)
    assert isinstance(m.upload_content_types, frozenset) and m.upload_content_types
    assert all(MIME.match(t) for t in m.upload_content_types), m.upload_content_types
    assert m.upload_hint.strip() and m.input_hint.strip()


@pytest.mark.parametrize("name", NAMES)
def test_a_refused_content_type_is_415_with_the_modalitys_hint(name: str) -> None:
    m = get_modality(name)
    with pytest.raises(UnsupportedMediaTypeError) as info:
        check_upload(Upload(b"x", "x.bin", "application/x-not-a-format"), m, 10**6, 10**6)
    assert info.value.status_code == 415 and info.value.hint == m.upload_hint
    assert name in info.value.message


@pytest.mark.parametrize("name", NAMES)
def test_json_text_is_never_a_path_on_the_server(name: str, tmp_path) -> None:
    """A JSON string is refused with the modality's ``input_hint``, or read as the data it
    is (SMILES, DNA), by a modality that takes text inline."""
    m = get_modality(name)
    path = tmp_path / "secret.csv"
    path.write_text("a,b\n1,2\n")
    try:
        source = m.from_json(str(path))
    except DataError as e:
        assert e.hint == m.input_hint and "file paths on the server are not read" in e.message
        return
    assert m.inline_flag is not None, f"{name} passes JSON text through"
    assert source == str(path) or str(path) in str(source)


@pytest.mark.parametrize("name", NAMES)
def test_json_objects_reach_the_reader_or_become_uploads(name: str) -> None:
    m = get_modality(name)
    item = {"resourceType": "Bundle", "type": "collection", "entry": []}
    out = m.from_json(item)
    assert out is item or isinstance(out, Upload)


@pytest.mark.parametrize("name", NAMES)
def test_inspect_upload_reads_no_more_than_a_header(name: str) -> None:
    m = get_modality(name)
    size = m.inspect_upload(Upload(b"hello", "x.txt", "text/plain"))
    assert isinstance(size, DeclaredSize)


def test_image_attachments_become_uploads_with_their_declared_type() -> None:
    import base64

    m = get_modality("image")
    out = m.from_json({"resourceType": "Binary", "contentType": "image/png",
                       "data": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()})
    assert isinstance(out, Upload) and out.content_type == "image/png"
    assert out.data == b"\x89PNG\r\n\x1a\n"
