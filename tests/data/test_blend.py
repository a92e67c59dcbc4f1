import numpy as np
import pytest

from megatron.flexsp.data.blend import BlendedDocuments, parse_data_path
from megatron.flexsp.data.documents import DocumentDataset, select_documents


class ListDocs(DocumentDataset):
    """In-memory documents tagged with their component id (first token)."""

    def __init__(self, tag, lengths):
        self.name = f"c{tag}"
        self.tag = tag
        self.doc_ids, self.lengths, self.stats = select_documents(np.asarray(lengths) + 1, 10**6)

    def _read(self, i):
        return np.concatenate([[self.tag, i], np.zeros(self.lengths[i] - 1, dtype=np.int64)])


def test_parse_data_path():
    assert parse_data_path(["a"]) == (None, ["a"])
    assert parse_data_path(["a", "b"]) == (None, ["a", "b"])
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == ([0.3, 0.7], ["a", "b"])
    assert parse_data_path(["1", "a"]) == ([1.0], ["a"])


@pytest.mark.parametrize(
    "spec, match",
    [
        ([], "empty"),
        (["0.3", "a", "0.7"], "odd number"),
        (["0.3", "a", "b", "c"], "expected a weight, got 'b'"),
        (["a", "0.5", "b"], "mixes prefixes and weights"),
        (["-1", "a", "2", "b"], "weight -1 of 'a'"),
        (["0", "a", "0", "b"], "sum to 0"),
        (["0.5", "0.5"], "got the number '0.5'"),
        (["nan", "a"], "must be finite"),
    ],
)
def test_bad_blend_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_data_path(spec)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 2], [0.05, 0.9, 0.05]])
def test_document_proportions_every_prefix(weights):
    comps = [ListDocs(t, np.full(7 + 13 * t, 5)) for t in range(len(weights))]
    size = 1000
    blend = BlendedDocuments(comps, weights, size=size, seed=3)
    w = np.asarray(weights, float) / sum(weights)
    counts = np.zeros(len(weights))
    for j in range(size):  # reference: the tags actually read, prefix by prefix
        counts[blend[j][0]] += 1
        assert np.all(np.abs(counts - w * (j + 1)) <= 1.0 + 1e-9), (j, counts)
    assert blend.component_counts().tolist() == counts.tolist()


def test_token_proportions():
    rng = np.random.default_rng(0)
    comps = [ListDocs(0, rng.integers(1, 50, 40)), ListDocs(1, rng.integers(100, 400, 40))]
    blend = BlendedDocuments(comps, [0.5, 0.5], size=600, seed=1, by="tokens")
    tokens = np.zeros(2)
    for j in range(len(blend)):
        doc = blend[j]
        tokens[doc[0]] += len(doc)
    assert abs(tokens[0] - tokens[1]) <= 401  # within one document of the target share
    by_docs = BlendedDocuments(comps, [0.5, 0.5], size=600, seed=1)
    assert abs(by_docs.component_counts()[0] - 300) <= 1


def test_upsampling_repeats_evenly_and_lengths_match():
    small, big = ListDocs(0, np.arange(1, 6)), ListDocs(1, np.arange(1, 101))
    blend = BlendedDocuments([small, big], [0.5, 0.5], size=100, seed=0)
    reads = [blend[j] for j in range(len(blend))]
    assert blend.lengths.tolist() == [len(r) - 1 for r in reads]
    small_ids = [int(r[1]) for r in reads if r[0] == 0]
    assert np.bincount(small_ids, minlength=5).tolist() == [10] * 5  # 50 draws, 5 docs: each 10x
    passes = [sorted(small_ids[i : i + 5]) for i in range(0, 50, 5)]
    assert passes == [list(range(5))] * 10  # every pass is a permutation of the component
    assert len({tuple(small_ids[i : i + 5]) for i in range(0, 50, 5)}) > 1  # reshuffled between passes
    big_ids = [int(r[1]) for r in reads if r[0] == 1]
    assert len(set(big_ids)) == 50  # subsampled without repeats within a pass


def test_unweighted_default_size_uses_every_document_once_and_is_deterministic():
    comps = [ListDocs(0, np.arange(1, 30)), ListDocs(1, np.arange(1, 12))]
    sizes = [float(len(c)) for c in comps]
    a = BlendedDocuments(comps, sizes, seed=5)
    b = BlendedDocuments(comps, sizes, seed=5)
    assert len(a) == 40
    seen = sorted((int(a[j][0]), int(a[j][1])) for j in range(len(a)))
    assert seen == [(0, i) for i in range(29)] + [(1, i) for i in range(11)]
    assert np.array_equal(a.sample, b.sample) and np.array_equal(a.component, b.component)
    assert not np.array_equal(a.sample, BlendedDocuments(comps, sizes, seed=6).sample)


def test_blend_errors():
    c = ListDocs(0, [3, 4])
    empty = ListDocs(1, [])
    with pytest.raises(ValueError, match="2 weights"):
        BlendedDocuments([c], [0.5, 0.5])
    with pytest.raises(ValueError, match="'c1' has weight 1 but no documents"):
        BlendedDocuments([c, empty], [1, 1])
    with pytest.raises(ValueError, match="blend unit"):
        BlendedDocuments([c], [1], by="bytes")
