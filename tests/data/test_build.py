import numpy as np
import pytest

from megatron.flexsp.data.blend import BlendedDocuments
from megatron.flexsp.data.build import DataConfig, build_datasets, build_split_datasets, parse_split, split_ranges
from megatron.flexsp.data.mock import MockConfig


def megatron_reference_split(split, size):
    """Megatron's get_split_indices, re-derived: round each share, shift the excess off the end."""
    weights = [float(x) for x in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    weights = [w / sum(weights) for w in weights]
    idx = [0]
    for w in weights:
        idx.append(idx[-1] + int(round(w * float(size))))
    diff = idx[-1] - size
    for i in range(1, len(idx)):
        idx[i] -= diff
    return [(idx[i], idx[i + 1]) for i in range(3)]


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1", "1,1,1", "7,3"])
@pytest.mark.parametrize("n", [1, 10, 101, 9999])
def test_split_ranges_match_reference(split, n):
    got = split_ranges(split, n)
    ref = megatron_reference_split(split, n)
    if all(a >= 0 for r in ref for a in r):
        assert got == ref
    assert got[0][0] == 0 and got[-1][1] == n and all(got[i][1] == got[i + 1][0] for i in range(2))


@pytest.mark.parametrize(
    "split, match",
    [("a,b", "expected up to 3"), ("1,2,3,4", "1 to 3 numbers"), ("0,0,0", "positive sum"), ("-1,2", ">= 0")],
)
def test_bad_split(split, match):
    with pytest.raises(ValueError, match=match):
        parse_split(split)
    with pytest.raises(ValueError, match=match):
        build_datasets(DataConfig(seq_length=8, mock=True, split=split))


def _files(write_prefix, name, n, seed):
    rng = np.random.default_rng(seed)
    return write_prefix(name, [rng.integers(0, 258, int(c)) for c in rng.integers(0, 60, n)])


def test_splits_are_disjoint_and_cover(write_prefix):
    prefix = _files(write_prefix, "a", 500, 0)
    splits = build_split_datasets(DataConfig(seq_length=20, data_path=[prefix], split="80,15,5", overlong="drop"))
    ids = {k: set(v.doc_ids.tolist()) for k, v in splits.items()}
    assert not ids["train"] & ids["valid"] and not ids["train"] & ids["test"] and not ids["valid"] & ids["test"]
    assert max(ids["train"]) < min(ids["valid"]) and max(ids["valid"]) < min(ids["test"])
    total = sum((v.stats for v in splits.values()), type(splits["train"].stats)())
    assert total.documents == 500
    # the split does not depend on seq_length: a kept document stays in its split
    wide = build_split_datasets(DataConfig(seq_length=100, data_path=[prefix], split="80,15,5"))
    for k in ids:
        assert ids[k] <= set(wide[k].doc_ids.tolist())
    train, valid = build_datasets(DataConfig(seq_length=20, data_path=[prefix], split="1,0,0"))
    assert valid is None and len(train) > 0


def test_weighted_blend_from_files(write_prefix):
    a, b = _files(write_prefix, "a", 300, 1), _files(write_prefix, "b", 100, 2)
    train, valid = build_datasets(DataConfig(seq_length=30, data_path=["0.25", a, "0.75", b], split="90,10,0"))
    assert isinstance(train, BlendedDocuments) and isinstance(valid, BlendedDocuments)
    n = len(train)
    assert abs(train.component_counts()[0] - 0.25 * n) <= 1
    assert [d.prefix for d in train.datasets] == [a, b]
    for j in range(0, n, 17):
        assert len(train[j]) == train.lengths[j] + 1
    unweighted, _ = build_datasets(DataConfig(seq_length=30, data_path=[a, b], split="90,10,0"))
    assert len(unweighted) == sum(len(d) for d in unweighted.datasets)  # every document once


def test_source_errors(tmp_path, write_prefix):
    with pytest.raises(ValueError, match="exactly one data source"):
        build_datasets(DataConfig(seq_length=8))
    with pytest.raises(ValueError, match="exactly one data source"):
        build_datasets(DataConfig(seq_length=8, mock=True, data_path=["x"]))
    with pytest.raises(FileNotFoundError, match="nope"):
        build_datasets(
            DataConfig(seq_length=8, data_path=["0.5", str(tmp_path / "nope"), "0.5", str(tmp_path / "nope2")])
        )
    with pytest.raises(ValueError, match="odd number"):
        build_datasets(DataConfig(seq_length=8, data_path=["0.5", "a", "0.5"]))
    tiny = write_prefix("short", [np.arange(50)] * 20)
    with pytest.raises(ValueError, match="no training documents left"):
        build_datasets(DataConfig(seq_length=8, data_path=[tiny], overlong="drop"))


def test_mock_determinism_and_lengths():
    cfg = dict(
        seq_length=512, mock=True, seed=11, mock_config=MockConfig(num_documents=400, max_len=2048, median=200.0)
    )
    t1, v1 = build_datasets(DataConfig(**cfg))
    t2, v2 = build_datasets(DataConfig(**cfg))
    assert np.array_equal(t1.lengths, t2.lengths) and len(t1) + len(v1) <= 400
    for i in range(0, len(t1), 13):
        a, b = t1[i], t2[i]
        assert np.array_equal(a, b) and len(a) == t1.lengths[i] + 1 and a.max() < 258
    assert t1.lengths.max() == 512 and t1.stats.truncated > 0  # max_len > seq_length: truncated
    other, _ = build_datasets(DataConfig(**{**cfg, "seed": 12}))
    assert not np.array_equal(other.lengths[:50], t1.lengths[:50])
    dropped, _ = build_datasets(DataConfig(**{**cfg, "overlong": "drop"}))
    assert len(dropped) == len(t1) - t1.stats.truncated and dropped.lengths.max() <= 512
    # tokens depend on the raw document only, not on the split or the filter around it
    j = int(np.flatnonzero(dropped.doc_ids == t1.doc_ids[5])[0]) if t1.lengths[5] < 512 else None
    if j is not None:
        assert np.array_equal(dropped[j], t1[5])


def test_from_args_namespace_equals_dataclass():
    import argparse

    ns = argparse.Namespace(
        seq_length=300,
        data_path=None,
        split="90,10,0",
        mock_data=True,
        mock_data_num_docs=200,
        mock_data_median=50,
        mock_data_max_len=600,
        overlong="drop",
        seed=3,
    )
    cfg = DataConfig.from_args(ns)
    assert cfg.mock and not cfg.stdlib_corpus and cfg.overlong == "drop" and cfg.mock_config.num_documents == 200
    a, _ = build_datasets(ns)
    b, _ = build_datasets(
        DataConfig(
            seq_length=300,
            split="90,10,0",
            mock=True,
            overlong="drop",
            seed=3,
            mock_config=MockConfig(num_documents=200, median=50, max_len=600),
        )
    )
    assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a[7], b[7])
    default = DataConfig.from_args(argparse.Namespace(seq_length=64, stdlib_max_docs=5))
    assert default.stdlib_corpus and not default.mock and default.stdlib_max_files == 5
