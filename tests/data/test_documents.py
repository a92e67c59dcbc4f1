import pickle

import numpy as np
import pytest

from megatron.flexsp.data.documents import IndexedDocuments, select_documents


def _raw_docs(seed=0, n=300, max_tokens=120):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_tokens, size=n)
    counts[:4] = [0, 1, 2, max_tokens + 50]  # the edges: empty, 1 token, exactly 2, overlong
    return [rng.integers(0, 258, size=int(c)) for c in counts]


def _brute_force(docs, seq_length, overlong):
    kept, stats = [], dict(truncated=0, dropped_overlong=0, skipped_short=0)
    for d, doc in enumerate(docs):
        if len(doc) < 2:
            stats["skipped_short"] += 1
        elif len(doc) > seq_length + 1 and overlong == "drop":
            stats["dropped_overlong"] += 1
        else:
            if len(doc) > seq_length + 1:
                stats["truncated"] += 1
            kept.append((d, list(doc[: seq_length + 1])))
    return kept, stats


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
@pytest.mark.parametrize("seq_length", [1, 37, 200])
def test_filter_counts_and_tokens_match_brute_force(write_prefix, overlong, seq_length):
    docs = _raw_docs()
    prefix = write_prefix("d", docs, multi={5: [2, 0, len(docs[5]) - 2]} if len(docs[5]) >= 2 else None)
    ds = IndexedDocuments(prefix, seq_length, overlong)
    kept, stats = _brute_force(docs, seq_length, overlong)
    assert len(ds) == len(kept)
    assert ds.doc_ids.tolist() == [d for d, _ in kept]
    assert ds.lengths.tolist() == [len(t) - 1 for _, t in kept]
    for k in range(len(ds)):
        assert ds[k].tolist() == kept[k][1]
        assert ds[k].dtype == np.int64
    s = ds.stats
    assert (s.truncated, s.dropped_overlong, s.skipped_short) == (
        stats["truncated"],
        stats["dropped_overlong"],
        stats["skipped_short"],
    )
    assert s.documents == len(docs) and s.kept == len(kept)
    assert s.raw_tokens == sum(map(len, docs)) and s.kept_tokens == sum(len(t) for _, t in kept)
    assert s.truncated + s.dropped_overlong > 0 or seq_length == 200


def test_multi_sequence_document_is_concatenated(write_prefix):
    docs = [np.arange(10), np.arange(100, 105)]
    prefix = write_prefix("m", docs, multi={0: [3, 0, 7]})
    ds = IndexedDocuments(prefix, seq_length=5)  # truncation across the sequence boundary
    assert ds[0].tolist() == list(range(6))
    assert IndexedDocuments(prefix, seq_length=50)[0].tolist() == list(range(10))


def test_doc_range_and_pickle(write_prefix):
    docs = [np.arange(i + 2) for i in range(20)]
    ds = IndexedDocuments(write_prefix("r", docs), seq_length=100, doc_range=(5, 9))
    assert ds.doc_ids.tolist() == [5, 6, 7, 8] and ds.lengths.tolist() == [6, 7, 8, 9]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3].tolist() == list(range(10))
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
    with pytest.raises(ValueError, match="outside"):
        IndexedDocuments(ds.prefix, seq_length=10, doc_range=(5, 21))


def test_missing_prefix_and_bad_policy(tmp_path, write_prefix):
    with pytest.raises(FileNotFoundError, match=r"missing .*nothere\.idx, .*nothere\.bin"):
        IndexedDocuments(str(tmp_path / "nothere"), 10)
    prefix = write_prefix("x", [np.arange(3)])
    with pytest.raises(FileNotFoundError, match="without the .bin/.idx suffix"):
        IndexedDocuments(prefix + ".bin", 10)
    with pytest.raises(ValueError, match="overlong policy"):
        IndexedDocuments(prefix, 10, overlong="cut")
    with pytest.raises(ValueError, match="seq_length must be >= 1"):
        select_documents(np.array([3]), 0)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_lengths_agree_with_the_planners_torch_free_idx_reader(write_prefix, overlong):
    """The planner CLI reads lengths from .idx on its own; both must give the same L."""
    from megatron.flexsp.planner.lengths_io import apply_max_len, read_lengths

    docs = _raw_docs(seed=9)
    prefix = write_prefix("p", docs, multi={7: [1, len(docs[7]) - 1]} if len(docs[7]) >= 1 else None)
    ds = IndexedDocuments(prefix, 60, overlong)
    planner_lengths, _ = apply_max_len(read_lengths(prefix), 60, overlong)
    assert ds.lengths.tolist() == planner_lengths.tolist()
