"""Histopathology entries in the catalog and their download path (run here on file:// URLs)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from meddx import catalog as catalog_module
from meddx.catalog import DatasetEntry, get_entry
from meddx.errors import DataError


def test_kather_entries_name_source_licence_and_checksum() -> None:
    val = get_entry("crc_val_he_7k")
    assert val.license == "CC BY 4.0" and "10.5281/zenodo.1214456" in val.citation
    assert val.files["pathology/CRC-VAL-HE-7K.zip"] == {"md5": "2fd1651b4f94ebd818ebf90ad2b6ce06"}
    assert val.urls["pathology/CRC-VAL-HE-7K.zip"].startswith("https://zenodo.org/records/1214456/")
    train = get_entry("nct_crc_he_100k")
    assert train.files["pathology/NCT-CRC-HE-100K.zip"] == {}  # unverified: none recorded
    assert "NOT RECORDED" in train.description
    assert val.task.class_names == train.task.class_names and len(val.task.class_names) == 9


@pytest.mark.parametrize("tamper", [False, True])
def test_download_checks_the_md5_and_unpacks(tmp_path, monkeypatch, tamper) -> None:
    archive = tmp_path / "src" / "tiles.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("TILES/ADI/ADI-1.tif", b"tile")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    entry = DatasetEntry.model_validate({
        "name": "tiny_tiles", "title": "t", "modality": "image",
        "task": {"kind": "multiclass", "class_names": ["ADI", "TUM"]},
        "files": {"pathology/tiles.zip": {"md5": "0" * 32 if tamper else md5}},
        "urls": {"pathology/tiles.zip": archive.as_uri()}})
    monkeypatch.setattr(catalog_module, "get_entry", lambda name: entry)
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache"))
    if tamper:
        with pytest.raises(DataError, match="md5 mismatch"):
            catalog_module.download("tiny_tiles", progress=False)
        assert not (tmp_path / "cache" / "data" / "pathology" / "tiles.zip").exists()
        return
    folder = catalog_module.download("tiny_tiles", progress=False)
    assert folder == tmp_path / "cache" / "data" / "pathology"
    assert (folder / "TILES" / "ADI" / "ADI-1.tif").read_bytes() == b"tile"
