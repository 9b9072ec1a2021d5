"""Every row of PS3.15 Table E.1-1 (issue 23, point 18): each action code is carried out, and no
marker byte survives anywhere in the written file — preamble, file meta, private tags, sequences.

A file is built holding EVERY attribute the table lists, each with a marker value of its VR
from pydicom's dictionary; sequences get an item with a marked unlisted text element and a
marked private element. Rows that name a range (curves, overlays, private groups) get concrete
members. Rows pydicom cannot encode are skipped, and the skipped list is asserted explicitly.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from meddx.privacy import deidentify_file
from meddx.privacy.profile import Action, table_rows

UID_A, UID_B = "1.2.999777.1", "1.2.999777.2"
SHARED_MARKERS = {"DA": "19770314", "TM": "101112", "DT": "19770314101112", "AS": "077Y",
                  "DS": "7654.321", "IS": "7654321"}
PREAMBLE = b"MKPREAMBLE DOE^JOHN".ljust(128, b"#")
# Rows a Part 10 file cannot hold: command-group elements (0000,eeee) belong to DIMSE
# messages, and pydicom refuses to write them into a file
EXPECTED_UNENCODABLE = {"(0000,1000)", "(0000,1001)"}


def concrete_rows() -> list:
    return [r for r in table_rows() if "X" not in r.tag.upper().replace("0X", "")
            and "GGGG" not in r.tag.upper()]


def tag_of(row) -> int:
    return int(row.tag.strip("()").replace(",", ""), 16)


def marker_value(i: int, vr: str, uid: str, action: Action = Action.REMOVE):
    text = f"MK{i:03d}"
    if vr in SHARED_MARKERS:
        return SHARED_MARKERS[vr]
    if vr == "PN":
        return f"{text}^DOE"
    if vr == "UI":
        return uid
    if vr == "UR":
        return f"http://example.org/{text}"
    if vr in ("US", "SS", "UL", "SL"):
        return 0xBEEF
    if vr in ("OB", "OW", "UN"):
        return text.encode() + b"X"
    if vr == "SQ":
        item = Dataset()
        item.ExtendedCodeMeaning = f"{text}SQTEXT"
        item.add_new(0x00090010, "LO", "MKPRIVCREATOR")
        item.add_new(0x00091001, "LO", f"{text}SQPRIV")
        if action is Action.DUMMY:  # e.g. Institution Code Sequence: its code names the site
            item.CodeValue = f"{text}CODE"
        return Sequence([item])
    return text


def encodable(tag: int, vr: str, value) -> bool:
    probe = Dataset()
    probe.add_new(tag, vr, value)
    probe.file_meta = FileMetaDataset()
    probe.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    probe.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    probe.file_meta.MediaStorageSOPInstanceUID = UID_A
    buffer = BytesIO()
    try:
        probe.save_as(buffer, enforce_file_format=True)
    except ValueError:  # what pydicom refuses to write into a file
        return False
    return tag in pydicom.dcmread(BytesIO(buffer.getvalue()))


def build(tmp_path: Path) -> tuple[Path, dict[int, object], list[str], list[bytes]]:
    """The marked file, each placed row's input value, the skipped rows, and every marker."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(16)
    ds.file_meta = FileMetaDataset()
    placed, skipped, markers = {}, [], [b"MKPREAMBLE", b"MKPRIV", b"999777", b"\xef\xbe",
                                         *(m.encode() for m in SHARED_MARKERS.values())]
    for i, row in enumerate(concrete_rows()):
        tag, vr = tag_of(row), dictionary_VR(tag_of(row)).split(" or ")[0]
        value = marker_value(i, vr, UID_A if i % 2 else UID_B, row.action)
        if tag >> 16 == 0x0002:  # file meta (Media Storage SOP Instance UID)
            ds.file_meta.add_new(tag, vr, value)
            placed[tag] = value
            continue
        if not encodable(tag, vr, value):
            skipped.append(row.tag)
            continue
        ds.add_new(tag, vr, value)
        placed[tag] = value
        markers.append(f"MK{i:03d}".encode())
    ds.add_new(0x00090010, "LO", "MKPRIVCREATOR")
    ds.add_new(0x00091001, "LO", "MKPRIVVALUE")
    ds.add_new(0x50003000, "OW", b"MKCURVE!")  # (50xx,xxxx) curve data
    ds.add_new(0x60003000, "OW", b"MKOVERLY")  # (60xx,3000) overlay data
    ds.add_new(0x60004000, "LT", "MKOVERLAYCOMMENT")  # (60xx,4000) overlay comments
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "MKSOURCEAE"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.999777.3"
    ds.file_meta.PrivateInformation = b"MKMETAPRIV"
    ds.file_meta.ImplementationVersionName = "MKIMPLNAME"
    ds.preamble = PREAMBLE
    ds.SOPInstanceUID = ds.get("SOPInstanceUID", UID_A)
    path = tmp_path / "marked.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert raw[:10] == b"MKPREAMBLE" and b"MKSOURCEAE" in raw and b"MKIMPLNAME" in raw
    return path, placed, skipped, markers + [b"MKCURVE", b"MKOVERLY", b"MKSOURCEAE",
                                            b"MKMETAPRIV", b"MKIMPLNAME"]


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e11")
    path, placed, skipped, markers = build(tmp)
    deidentify_file(path, tmp / "out.dcm", salt="s3cret")
    return placed, skipped, markers, tmp / "out.dcm"


def test_every_row_is_placed_or_listed_as_unencodable(marked) -> None:
    placed, skipped, _, _ = marked
    assert len(table_rows()) == 621
    assert len(concrete_rows()) == 621 - 4  # curves, overlay data, overlay comments, private
    assert set(skipped) == EXPECTED_UNENCODABLE, skipped
    assert len(placed) + len(skipped) == len(concrete_rows())


def test_no_marker_byte_survives_anywhere(marked) -> None:
    _, _, markers, out = marked
    written = out.read_bytes()
    assert written[:128] == bytes(128)
    assert [m for m in markers if m in written] == []


def test_each_action_code_is_carried_out(marked) -> None:
    placed, _, _, out_path = marked
    out = pydicom.dcmread(out_path)
    seen: dict[str, str] = {}
    for row in concrete_rows():
        tag = tag_of(row)
        if tag not in placed:
            continue
        if tag >> 16 == 0x0002:  # U in the file meta: the new SOP Instance UID
            assert out.file_meta[tag].value == out.SOPInstanceUID != placed[tag]
            continue
        action, elem = row.action, out.get(tag)
        where = f"{row.tag} {row.name} ({row.code})"
        if action is Action.REMOVE:
            assert elem is None, where
        elif action is Action.EMPTY:
            assert elem is not None and elem.is_empty, where
        elif elem is not None and elem.VR == "SQ":  # D, X/Z/U*: structure kept, items walked
            assert action in (Action.DUMMY, Action.REMAP) and len(elem.value) == 1, where
            item = elem.value[0]  # private creator and element gone, free text a dummy
            assert item.ExtendedCodeMeaning == "ANONYMIZED", where
            assert len(item) == 1 + (action is Action.DUMMY), where
            assert item.get("CodeValue", "ANONYMIZED") == "ANONYMIZED", where
        elif action is Action.DUMMY:
            assert elem is not None and not elem.is_empty, where
            assert str(elem.value) != str(placed[tag]), where
        else:
            assert action is Action.REMAP and pydicom.uid.UID(elem.value).is_valid, where
            assert seen.setdefault(str(placed[tag]), elem.value) == elem.value, where
    assert len(set(seen.values())) == 2 and not set(seen.values()) & {UID_A, UID_B}
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    for tag in (0x50003000, 0x60003000, 0x60004000, 0x00091001):
        assert tag not in out


def test_retain_patient_characteristics_keeps_k_rows_and_cleans_c_rows(
        marked, tmp_path: Path) -> None:
    path, placed, _, _ = build(tmp_path)
    deidentify_file(path, tmp_path / "kept.dcm", salt="s", keep_patient_characteristics=True)
    out = pydicom.dcmread(tmp_path / "kept.dcm")
    option = [r for r in concrete_rows() if r.options.get("rtnPatCharsOpt")]
    assert len(option) == 13
    for row in option:
        tag = tag_of(row)
        if row.options["rtnPatCharsOpt"] == "K":
            assert str(out[tag].value) == str(placed[tag]), row.name
        else:  # C: free text cannot be cleaned automatically, so the basic action stands
            assert tag not in out or str(out[tag].value) != str(placed[tag]), row.name
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113108"]
