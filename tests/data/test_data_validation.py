"""Start-up validation of Megatron .bin/.idx files: a bad index or a truncated .bin is a one-line
ValueError naming the file, before training, instead of megatron's AssertionError or a failure at
the first affected document mid-run."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron.flexsp.data import indexed
from megatron.flexsp.data.build import DataConfig, build_datasets

DOCS = [list(range(1, 1 + n)) for n in (5, 9, 3, 12, 7, 4, 8, 6)]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_good_files_pass_and_match_megatron(write_prefix, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(indexed, "_CHUNK", chunk)
    prefix = write_prefix("good", DOCS, multi={1: [4, 5]})
    indexed.validate_indexed(prefix)
    ds = indexed.open_indexed(prefix)
    # independent reference: the token counts we wrote
    assert indexed.document_token_counts(ds).tolist() == [len(d) for d in DOCS]


@pytest.mark.parametrize(
    "case, match",
    [
        ("magic", r"good\.idx: bad magic b'XXIDIDX\\x00\\x00', not a Megatron \.idx index"),
        ("version", r"\.idx: index format version 2, this reader supports version 1"),
        ("dtype", r"\.idx: unknown token dtype code 99"),
        ("idx-truncated", r"\.idx: \d+ bytes, but its header announces 9 sequences and 9 document indices"),
        ("header-only", r"\.idx: 20 bytes, too short"),
        ("doc-index", r"\.idx: document indices are not a non-decreasing list"),
        (
            "bin-truncated",
            r"good\.bin: \d+ bytes, but .*good\.idx needs 108: the \.bin is truncated "
            r"\(document 6 onwards is missing\)",
        ),
    ],
)
@pytest.mark.parametrize("chunk", [None, 2], ids=["one-chunk", "chunks-of-2"])
def test_bad_files_are_one_line_value_errors(write_prefix, monkeypatch, case, match, chunk):
    if chunk:  # the index is checked in chunks (bounded memory): the same answers across chunk borders
        monkeypatch.setattr(indexed, "_CHUNK", chunk)
    prefix = write_prefix("good", DOCS, multi={1: [4, 5]})  # 8 documents, 9 sequences, uint16
    ip, bp = prefix + ".idx", prefix + ".bin"
    if case == "magic":
        _patch(ip, 0, b"XX")
    elif case == "version":
        _patch(ip, 9, struct.pack("<Q", 2))
    elif case == "dtype":
        _patch(ip, 17, bytes([99]))
    elif case == "idx-truncated":
        os.truncate(ip, os.path.getsize(ip) - 8)
    elif case == "header-only":
        os.truncate(ip, 20)
    elif case == "doc-index":
        _patch(ip, 34 + 9 * 12 + 8, struct.pack("<q", 7))  # document 1 starts after the last sequence
    elif case == "bin-truncated":
        # documents 6 and 7 (8 + 6 tokens, 2 bytes each) end at byte 108; cut inside document 6
        assert os.path.getsize(bp) == 2 * sum(len(d) for d in DOCS) == 108
        os.truncate(bp, 2 * sum(len(d) for d in DOCS[:6]) + 4)
    with pytest.raises(ValueError, match=match) as e:
        indexed.open_indexed(prefix)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["magic", "bin-truncated"])
def test_build_datasets_refuses_before_training(write_prefix, case):
    good = write_prefix("a", [np.arange(1, 40) % 250 + 1 for _ in range(20)])
    bad = write_prefix("b", [np.arange(1, 30) % 250 + 1 for _ in range(20)])
    build_datasets(DataConfig(seq_length=64, data_path=["1", good, "1", bad]))  # fine before the damage
    if case == "magic":
        _patch(bad + ".idx", 0, b"\0")
        want = r"b\.idx: bad magic"
    else:
        os.truncate(bad + ".bin", os.path.getsize(bad + ".bin") - 1)
        want = r"b\.bin: \d+ bytes, .* the \.bin is truncated \(document 19 onwards is missing\)"
    with pytest.raises(ValueError, match=want):
        build_datasets(DataConfig(seq_length=64, data_path=["1", good, "1", bad]))
