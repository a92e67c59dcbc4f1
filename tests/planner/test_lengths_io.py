"""Reading planner lengths: text, .npy, and a Megatron .bin/.idx written by megatron.core itself."""

import numpy as np
import pytest

from megatron.flexsp.planner.lengths_io import LengthsError, apply_max_len, read_lengths, read_megatron_document_sizes


def test_text_file_with_comments_and_blank_lines(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("# lengths\n100\n\n 7 \n300\n")
    assert read_lengths(p).tolist() == [100, 7, 300]


@pytest.mark.parametrize(
    "content,match",
    [("100\nabc\n", r"l.txt:2: 'abc' is not an integer"), ("5\n0\n", r"l.txt:2: length 0"), ("# only\n", "no lengths")],
)
def test_text_file_errors_name_the_line(tmp_path, content, match):
    p = tmp_path / "l.txt"
    p.write_text(content)
    with pytest.raises(LengthsError, match=match):
        read_lengths(p)


def test_npy(tmp_path):
    p = tmp_path / "l.npy"
    np.save(p, np.array([5, 9, 1], dtype=np.int32))
    out = read_lengths(p)
    assert out.dtype == np.int64 and out.tolist() == [5, 9, 1]
    np.save(p, np.array([5.0, 2.5]))
    with pytest.raises(LengthsError, match=r"#1 = 2.5 is not an integer"):
        read_lengths(p)
    np.save(p, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(LengthsError, match="1-D"):
        read_lengths(p)
    np.save(p, np.array([3, -1]))
    with pytest.raises(LengthsError, match=r"#1 = -1"):
        read_lengths(p)


def test_missing_file():
    with pytest.raises(LengthsError, match="not found: /nonexistent/x"):
        read_lengths("/nonexistent/x")


def test_megatron_indexed_dataset_written_by_megatron_core(tmp_path):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    token_counts = []
    for d in range(40):
        if d % 7 == 3:  # a document of several items (sequences)
            parts = [int(x) for x in rng.integers(1, 50, size=3)]
            for n in parts:
                builder.add_item(torch.from_numpy(rng.integers(0, 1000, size=n).astype(np.int64)))
            builder.end_document()
            token_counts.append(sum(parts))
        else:
            n = 1 if d % 11 == 0 else int(rng.integers(2, 3000))
            builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=n).astype(np.int64)), [n])
            token_counts.append(n)
    builder.finalize(prefix + ".idx")

    sizes = read_megatron_document_sizes(prefix)
    # reference: megatron.core's own reader
    ds = IndexedDataset(prefix)
    ref = [
        int(sum(ds.sequence_lengths[ds.document_indices[i] : ds.document_indices[i + 1]]))
        for i in range(len(ds.document_indices) - 1)
    ]
    assert sizes.tolist() == ref == token_counts
    expected = [n - 1 for n in token_counts if n >= 2]  # L = ids - 1, 1-token documents skipped
    assert read_lengths(prefix).tolist() == expected
    assert read_lengths(prefix + ".idx").tolist() == expected
    assert read_lengths(prefix + ".bin").tolist() == expected


def test_bad_idx(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + b"\0" * 40)
    with pytest.raises(LengthsError, match="bad magic"):
        read_megatron_document_sizes(tmp_path / "x")
    (tmp_path / "y.idx").write_bytes(
        b"MMIDIDX\x00\x00"
        + (1).to_bytes(8, "little")
        + b"\x04"
        + (10).to_bytes(8, "little")
        + (11).to_bytes(8, "little")
    )
    with pytest.raises(LengthsError, match="truncated"):
        read_lengths(tmp_path / "y")


def test_apply_max_len_modes():
    x = np.array([10, 500, 20, 900])
    out, rep = apply_max_len(x, 100, "truncate")
    assert out.tolist() == [10, 100, 20, 100] and rep.truncated == 2 and rep.dropped == 0
    out, rep = apply_max_len(x, 100, "drop")
    assert out.tolist() == [10, 20] and rep.dropped == 2 and rep.truncated == 0
    with pytest.raises(LengthsError, match=r"2 sequence\(s\) longer than the max length 100: first is #1 with 500"):
        apply_max_len(x, 100, "error")
    out, rep = apply_max_len(x, None, "error")
    assert out.tolist() == x.tolist() and rep.truncated == rep.dropped == 0
    with pytest.raises(LengthsError, match="overlong mode"):
        apply_max_len(x, 100, "cut")
    with pytest.raises(LengthsError, match="all 4 sequences"):
        apply_max_len(x, 5, "drop")
