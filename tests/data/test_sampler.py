import pickle

import numpy as np
import pytest

from megatron.flexsp.data.documents import IndexedDocuments
from megatron.flexsp.data.sampler import GlobalBatchSampler, read_batch


def test_deterministic_and_epochs_cover_documents():
    lengths = np.arange(103)
    a, b = GlobalBatchSampler(lengths, 10, seed=7), GlobalBatchSampler(lengths, 10, seed=7)
    assert a.batches_per_epoch == 10
    for k in range(35):
        assert np.array_equal(a.batch_indices(k), b.batch_indices(k))
    for epoch in range(3):
        idx = np.concatenate([a.batch_indices(epoch * 10 + i) for i in range(10)])
        assert len(idx) == 100 and len(set(idx.tolist())) == 100  # no repeats within an epoch
    e0 = np.concatenate([a.batch_indices(i) for i in range(10)])
    e1 = np.concatenate([a.batch_indices(10 + i) for i in range(10)])
    assert not np.array_equal(e0, e1)  # reshuffled per epoch
    c = GlobalBatchSampler(lengths, 10, seed=8)
    assert not np.array_equal(a.batch_indices(0), c.batch_indices(0))
    # reference: the epoch order is numpy's permutation seeded by (seed, epoch)
    assert np.array_equal(e1, np.random.default_rng([7, 1]).permutation(103)[:100])
    assert np.array_equal(a.batch_lengths(3), lengths[a.batch_indices(3)])
    noshuf = GlobalBatchSampler(lengths, 10, seed=7, shuffle=False)
    assert noshuf.batch_indices(11).tolist() == list(range(10, 20))


def test_resume_from_state_dict_is_exact():
    lengths = np.random.default_rng(0).integers(1, 1000, 57)
    full = GlobalBatchSampler(lengths, 8, seed=1)
    reference = [full.next()[1] for _ in range(20)]  # crosses two epoch boundaries (7 per epoch)
    first = GlobalBatchSampler(lengths, 8, seed=1)
    for _ in range(9):
        first.next()
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = GlobalBatchSampler(lengths, 8, seed=1)
    assert resumed.upcoming_lengths(1)[0].tolist() == lengths[reference[0]].tolist()
    resumed.load_state_dict(state)
    assert [lengths[r].tolist() for r in reference[9:12]] == [x.tolist() for x in resumed.upcoming_lengths(3)]
    for k in range(9, 20):
        got_k, idx = resumed.next()
        assert got_k == k and np.array_equal(idx, reference[k])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(seed=2), "mismatch on seed"),
        (dict(global_batch_size=4), "mismatch on global_batch_size"),
        (dict(lengths=np.arange(1, 58)), "mismatch on lengths_fingerprint"),
        (dict(lengths=np.arange(60)), "mismatch on num_documents"),
    ],
)
def test_resume_mismatch_is_an_error(change, match):
    lengths = np.arange(57)
    state = GlobalBatchSampler(lengths, 8, seed=1).state_dict()
    kw = dict(
        dataset_lengths=change.get("lengths", lengths),
        global_batch_size=change.get("global_batch_size", 8),
        seed=change.get("seed", 1),
    )
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(**kw).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        GlobalBatchSampler(lengths, 8, seed=1).load_state_dict({"next_batch": 3})


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(np.arange(5), 6, seed=0)
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        GlobalBatchSampler(np.arange(5), 0, seed=0)
    with pytest.raises(IndexError):
        GlobalBatchSampler(np.arange(5), 2, seed=0).batch_indices(-1)


def test_batch_lengths_match_tokens_read(write_prefix):
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 258, int(n)) for n in rng.integers(0, 90, 120)]
    ds = IndexedDocuments(write_prefix("s", docs), seq_length=50, overlong="truncate")
    sampler = GlobalBatchSampler(ds.lengths, 16, seed=3)
    for k in range(2 * sampler.batches_per_epoch + 1):
        seqs = read_batch(ds, sampler.batch_indices(k))
        assert sampler.batch_lengths(k).tolist() == [len(s) - 1 for s in seqs]
        for i, s in zip(sampler.batch_indices(k), seqs):  # and the tokens are the file's
            raw = docs[ds.doc_ids[i]]
            assert s.tolist() == raw[: len(s)].tolist() and len(s) == min(len(raw), 51)
