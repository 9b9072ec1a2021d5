"""Fuzzing the readers (issue 16.5): a seeded share of mutated real inputs per reader must be
read or refused with a MeddxError, never crash or hang; every crash the fuzzer found is pinned
here by a hand-written regression input. The big share is ``benchmarks/fuzz.py``."""

from __future__ import annotations

import base64
import json
import signal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_support as F
from conftest import BINARY_SPEC, IN_CI, _untrained_package, require_data
from meddx.errors import DataError, InputMismatchError, MeddxError
from meddx.modalities import get_modality

CASE_SECONDS = 10  # a case over this is a hang

FAST = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
BIG = settings(max_examples=250, derandomize=True, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))


class Hang(BaseException):  # not an Exception: run_case must not count it as a crash
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"case ran over {CASE_SECONDS} s")


def _check(name: str, seed: int) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        out = F.run_case(name, seed)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert out.kind != "crash", f"{name} case {seed}: {out.error}: {out.message}"
    if out.kind == "rejected":  # the message names the problem, not a Python type
        assert out.message and "from NoneType" not in out.message, out.message


@pytest.fixture(scope="module", params=list(F.TARGETS))
def reader(request) -> str:
    name = request.param
    try:
        F.run_case(name, -1)  # seeds and libraries loaded outside the timed cases
    except F.MissingData as e:
        if IN_CI:
            pytest.fail(f"{e} (CI=true: missing data is a failure)")
        pytest.skip(str(e))
    return name


@given(seed=st.integers(0, 2**31 - 1))
@FAST
def test_fuzz_reader_never_crashes(reader, seed):
    _check(reader, seed)


@pytest.mark.slow
@given(seed=st.integers(0, 2**31 - 1))
@BIG
def test_fuzz_reader_never_crashes_big_share(reader, seed):
    _check(reader, seed)


def test_every_seed_is_read(reader):
    """The baseline: unmutated real inputs are read (the fuzzer starts from valid files)."""
    outcomes = [F.run_case(reader, -i - 1) for i in range(len(F.corpus(reader)))]
    assert all(o.kind != "crash" for o in outcomes), outcomes
    assert any(o.kind == "accepted" for o in outcomes), outcomes


# ------------------------------------------------------------------------ regressions: ECG
ECG_SPEC = dict(F.ECG_SPEC, leads=["I"])


def _ecg(source):
    return get_modality("ecg").read(source, ECG_SPEC)


@pytest.fixture(scope="module")
def a00002() -> dict[str, bytes]:
    root = require_data("ecg/physionet2017")
    return {n: (root / n).read_bytes() for n in ("A00002.hea", "A00002.mat")}


def test_signal_file_uploaded_without_header_says_so(a00002):
    """Was ValueError 'could not convert string to float' (bytes taken for an array)."""
    with pytest.raises(DataError, match=r"\.mat\) was uploaded without its \.hea header"):
        _ecg({"name": "A00002.mat", "data": a00002["A00002.mat"]})


def test_csv_ecg_upload_is_read():
    """Was ValueError: an uploaded CSV's bytes went to from_array."""
    text = "# fs=300\nI\n" + "\n".join(str((i % 50) / 50) for i in range(1500))
    sample = _ecg({"name": "ecg.csv", "data": text.encode()})
    assert sample.tensor.shape[1:] == (1, 500)


@pytest.mark.parametrize("fs", ["0", "0.00001", "1000000"])
def test_wfdb_header_rate_outside_ecg_range_is_refused(a00002, fs):
    """fs 0 was ZeroDivisionError; 1e-5 Hz asked resample_poly for 10^7× the samples."""
    header = a00002["A00002.hea"].replace(b" 300 ", f" {fs} ".encode(), 1)
    with pytest.raises(DataError, match="sampling rate .* Hz is outside"):
        _ecg({**a00002, "A00002.hea": header})


def test_wfdb_unknown_format_code_is_refused(a00002):
    """Was KeyError '200' from wfdb's dac (outside the reader's try)."""
    header = a00002["A00002.hea"].replace(b"16+24", b"200", 1)
    with pytest.raises(DataError, match="cannot read WFDB record"):
        _ecg({**a00002, "A00002.hea": header})


def test_wfdb_header_with_a_huge_line_is_refused_at_once(a00002):
    """A 20,000-character signal line kept wfdb's line patterns busy for 6 s (a fuzzing hang)."""
    import time

    header = a00002["A00002.hea"].replace(b"\nA00002.mat",
                                          b"\n" + b"1" * 20_000 + b"\nA00002.mat")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="line 2 is 20,000 characters long"):
        _ecg({**a00002, "A00002.hea": header})
    assert time.perf_counter() - t0 < 1.0


def test_ecg_array_of_text_is_refused():
    with pytest.raises(DataError, match="not an array of numbers"):
        _ecg({"data": [["a", "b", "c"]], "fs": 100})


def test_csv_rate_comment_that_is_not_a_number(tmp_path):
    """``# fs=.`` was ValueError from float('.')."""
    p = tmp_path / "x.csv"
    p.write_text("# fs=.\n1\n2\n3\n")
    with pytest.raises(DataError, match="sampling rate '.' is not a number"):
        _ecg(str(p))


def test_observation_component_not_a_list():
    """Was TypeError 'bool' object is not iterable before validation."""
    from conftest import synthetic_ecg_observation

    obs = synthetic_ecg_observation()
    obs["component"] = True
    with pytest.raises(DataError, match="not a valid FHIR R4 Observation"):
        _ecg(obs)


# ------------------------------------------------------------------------ regressions: EHR
@pytest.fixture(scope="module")
def stay_text() -> str:
    return require_data("ehr/physionet2012/set-a/132539.txt").read_text()


@pytest.mark.parametrize("time", ["9" * 400 + ":00", "0²:00"])
def test_physionet_line_with_unreadable_hour_is_listed(tmp_path, stay_text, time):
    """400-digit hours were OverflowError; a superscript digit passed isdigit() and broke int()."""
    p = tmp_path / "132539.txt"
    p.write_text(stay_text + f"{time},HR,80\n")
    sample = get_modality("ehr").read(str(p), F.ehr_spec())
    assert any("unreadable time" in i["reason"] for i in sample.meta["ignored"])


@pytest.fixture(scope="module")
def bundle() -> dict:
    from meddx.modalities.ehr.fhir import physionet_to_bundle

    return physionet_to_bundle(require_data("ehr/physionet2012/set-a/132539.txt"))


def _first(bundle: dict, rtype: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)


WRONG_TYPES = {  # each was AttributeError or TypeError
    "code is a list": lambda b: _first(b, "Observation").update(code=[1]),
    "coding is a bool": lambda b: _first(b, "Observation")["code"].update(coding=True),
    "system is a list": lambda b: _first(b, "Observation")["code"]["coding"][0].update(
        system=["x"]),
    "code is an object": lambda b: _first(b, "Observation")["code"]["coding"][0].update(
        code={"a": 1}),
    "unit is a list": lambda b: _first(b, "Observation")["valueQuantity"].update(
        unit=["mg"], code=None),
    "valueQuantity is a list": lambda b: _first(b, "Observation").update(valueQuantity=[1]),
    "effectivePeriod is a list": lambda b: _first(b, "Observation").update(
        effectivePeriod=[], effectiveDateTime=None),
    "Encounter.type is a number": lambda b: _first(b, "Encounter").update(type=3),
    "Patient.id is a list": lambda b: _first(b, "Patient").update(id=["p"]),
    "birthDate with letters": lambda b: _first(b, "Patient").update(birthDate="1970-ab"),
    "entry is an object": lambda b: b.update(entry={"resource": {}}),
}


@pytest.mark.parametrize("what", list(WRONG_TYPES))
def test_fhir_bundle_field_of_wrong_type(bundle, what):
    import copy

    doc = copy.deepcopy(bundle)
    WRONG_TYPES[what](doc)
    doc = json.loads(json.dumps(doc))  # drop the None values set above, as JSON would carry
    try:
        get_modality("ehr").read(doc, F.ehr_spec())
    except MeddxError as e:
        assert "no Encounter" in str(e) or "no Patient" in str(e) or "period" in str(e)


def test_deeply_nested_json_is_refused():
    """Was RecursionError out of json.loads."""
    with pytest.raises(DataError, match="nested too deeply"):
        get_modality("ehr").read(b"[" * 100_000 + b"]" * 100_000, F.ehr_spec())


# --------------------------------------------------------- regressions: images, sequences
def test_patient_resource_as_image_names_accepted_types():
    """Was DataError 'cannot read an image from NoneType'."""
    with pytest.raises(InputMismatchError) as e:
        get_modality("image").read({"resourceType": "Patient", "id": "p1"}, F.IMAGE_SPEC_2D)
    assert "Patient" in str(e.value)
    assert all(t in str(e.value) for t in ("Binary", "Media", "DocumentReference"))


def test_binary_resource_is_read_by_the_image_reader(breast_npz):
    from serving_support import breast_png

    png = base64.b64encode(breast_png(breast_npz)).decode()
    sample = get_modality("image").read(
        {"resourceType": "Binary", "contentType": "image/png", "data": png}, F.IMAGE_SPEC_2D)
    assert tuple(sample.tensor.shape) == (1, 28, 28)


@pytest.mark.parametrize("modality,spec", [("image", F.IMAGE_SPEC_2D),
                                           ("sequence", F.SEQ_SPEC)])
def test_path_too_long_is_a_data_error(modality, spec):
    """Was OSError 'File name too long' from Path.is_file."""
    with pytest.raises(DataError, match="not a usable file path"):
        get_modality(modality).read("ACGT" * 200 + ".fa", spec)


def test_uploaded_fasta_and_smiles_files_are_read():
    """An uploaded file reached the readers as {'name', 'data'}: 'needs a sequence field'."""
    seq = get_modality("sequence").read(
        {"name": "x.fasta", "data": b">s1\n" + b"ACGT" * 15 + b"\n"}, F.SEQ_SPEC)
    assert seq.tensor.shape == (4, 60)
    mol = get_modality("molecule").read({"name": "x.smi", "data": b"CCO ethanol\n"},
                                        F.MOL_SPEC)
    assert mol.meta["smiles"] == "CCO"


# ------------------------------------------------------------------ through a real server
@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    from meddx.serving.app import create_app
    from meddx.serving.auth import new_api_key
    from meddx.serving.settings import ServeSettings
    from serving_support import live_server

    tmp = tmp_path_factory.mktemp("fuzz_srv")
    pkg = _untrained_package(
        tmp, "img-untrained", "image",
        {"kind": "binary", "class_names": ["malignant", "benign"],
         "positive_class": "malignant"}, "resnet18", {}, {**F.IMAGE_SPEC_2D, **BINARY_SPEC})
    token, digest = new_api_key("fuzzer")
    settings = ServeSettings(api_keys={"fuzzer": digest}, research_use=True, warmup=False,
                             audit_log=tmp / "audit.jsonl")
    with live_server(create_app([pkg.path], settings)) as url:
        yield f"{url}/v1/models/img-untrained/predict", token


def _post(server: tuple[str, str], body: bytes) -> httpx.Response:
    url, token = server
    return httpx.post(url, content=body, timeout=30, headers={
        "Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"})


def test_server_patient_posted_as_image_gets_422_naming_accepted_types(image_server):
    r = _post(image_server, json.dumps({"resourceType": "Patient", "id": "p1"}).encode())
    assert r.status_code == 422, r.text
    msg = r.json()["message"] + " " + (r.json().get("hint") or "")
    assert "Patient" in msg and "NoneType" not in msg
    assert all(t in msg for t in ("Binary", "Media", "DocumentReference"))


def test_server_never_reads_a_file_named_in_json(image_server):
    """A JSON string was opened as a path on the server (the service read its own files)."""
    ct = str(require_data("dicom/CT_small.dcm"))
    for body in ({"inputs": [ct]}, {"inputs": [{"path": ct}]}):
        r = _post(image_server, json.dumps(body).encode())
        assert r.status_code == 422, r.text
        assert "file" in r.json()["message"]


@pytest.mark.parametrize("body,match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({"data": "AAAA", "contentType": ["image/png"]}).encode(), "must be strings"),
])
def test_server_malformed_json_bodies_get_422(image_server, body, match):
    """Both were 500s (RecursionError, AttributeError)."""
    r = _post(image_server, body)
    assert r.status_code == 422, r.text
    assert match in r.json()["message"]
