"""DNA reading: IUPAC fractional one-hot, FASTA parsing, and every bad input the issue lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddx.errors import DataError, InputMismatchError
from meddx.modalities import get_modality
from meddx.modalities.sequence.io import encode, parse_fasta, read_fasta, reverse_complement
from meddx.modalities.sequence.modality import RandomReverseComplement, parse_variant

SPEC = {"format": "dna-onehot", "channels": 4, "length": 8, "spatial_dims": 1,
        "task_kind": "binary", "positive_index": 1}


def test_iupac_codes_are_fractional_one_hot_and_lower_case_is_accepted() -> None:
    x = encode("ACGTNRDs")
    assert x.shape == (4, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, :4], np.eye(4))
    np.testing.assert_allclose(x[:, 4], [0.25] * 4)  # N
    np.testing.assert_allclose(x[:, 5], [0.5, 0, 0.5, 0])  # R = A/G
    np.testing.assert_allclose(x[:, 6], [1 / 3, 0, 1 / 3, 1 / 3])  # D = A/G/T
    np.testing.assert_allclose(x[:, 7], [0, 0.5, 0.5, 0])  # s = C/G, lower case
    np.testing.assert_allclose(x.sum(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(encode("u"), encode("T"))  # RNA U reads as T


def test_non_iupac_characters_are_an_error_naming_the_sequence() -> None:
    with pytest.raises(DataError, match=r"'seq7'.*'X'.*position 3") as e:
        encode("ACXGT", "seq7")
    assert e.value.context["sample_id"] == "seq7"
    with pytest.raises(DataError, match="empty sequence"):
        encode("   ", "blank")


def test_reverse_complement_on_strings_and_one_hot_agree() -> None:
    seq = "AACGTRN"
    assert reverse_complement(seq) == "NYACGTT"
    x = torch.from_numpy(encode(seq))
    flipped = RandomReverseComplement(p=1.0)(x)
    torch.testing.assert_close(flipped, torch.from_numpy(encode(reverse_complement(seq))))


def test_fasta_parsing_multiline_records_and_comments() -> None:
    recs = parse_fasta(">a first\nACGT\nacgt\n;comment\n>b\nNNNN\n")
    assert [(r.id, r.sequence) for r in recs] == [("a", "ACGTACGT"), ("b", "NNNN")]


@pytest.mark.parametrize("text,match", [
    ("", "contains no sequences"),
    ("\n\n", "contains no sequences"),
    ("ACGT\n>a\nACGT\n", "before the first '>' header"),
    (">a\n>b\nACGT\n", "record 'a' has no sequence"),
])
def test_bad_fasta_is_a_data_error(text: str, match: str, tmp_path: Path) -> None:
    p = tmp_path / "x.fa"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_fasta(p)


def test_read_accepts_string_fasta_text_path_and_dict(tmp_path: Path) -> None:
    mod = get_modality("sequence")
    fa = tmp_path / "one.fa"
    fa.write_text(">rec1\nACGTACGT\n")
    for source in ["acgtacgt", ">rec1\nACGTACGT", fa, str(fa), {"sequence": "ACGTACGT", "id": "d"}]:
        s = mod.read(source, SPEC)
        assert tuple(s.tensor.shape) == (4, 8)
        assert s.meta["sequence"] == "ACGTACGT"
    assert mod.read(fa, SPEC).id == "rec1"


def test_read_rejects_wrong_length_bad_characters_empty_and_multi_record(tmp_path: Path) -> None:
    mod = get_modality("sequence")
    with pytest.raises(InputMismatchError, match="has 5 bases; the model takes exactly 8"):
        mod.read("ACGTA", SPEC)
    with pytest.raises(DataError, match="outside the IUPAC"):
        mod.read("ACGTACGZ", SPEC)
    empty = tmp_path / "empty.fa"
    empty.write_text("")
    with pytest.raises(DataError, match="contains no sequences"):
        mod.read(empty, SPEC)
    with pytest.raises(DataError, match="not found"):
        mod.read(tmp_path / "missing.fa", SPEC)
    two = tmp_path / "two.fa"
    two.write_text(">a\nACGTACGT\n>b\nACGTACGT\n")
    with pytest.raises(DataError, match="holds 2 sequences"):
        mod.read(two, SPEC)


def test_variant_spec_parsing() -> None:
    assert parse_variant("seq.fa:31:A>G") == ("seq.fa", None, 31, "A", "G")
    assert parse_variant("dir/seq.fa:chr1:5:c>t") == ("dir/seq.fa", "chr1", 5, "C", "T")
    for bad in ["seq.fa:31", "seq.fa:x:A>G", "seq.fa:3:A-G"]:
        with pytest.raises(DataError, match="FILE:POSITION:REF>ALT"):
            parse_variant(bad)
