"""Bucketing DP (least padding for K buckets; fewest buckets meeting the error bound) against brute force."""

import itertools

import numpy as np
import pytest

from megatron.flexsp.planner.bucketing import bucketize, optimal_buckets


def brute_padding(lengths, k, breaks=()):
    """Least padding over every way to cut the sorted distinct lengths into exactly min(k, u) runs."""
    v = sorted(set(lengths))
    u = len(v)
    k = min(k, u)
    best = float("inf")
    for cuts in itertools.combinations(range(1, u), k - 1):
        bounds = [0, *cuts, u]
        uppers = [v[b - 1] for b in bounds[1:]]
        ok = all(not (v[a] <= br < v[b - 1]) for a, b in zip(bounds[:-1], bounds[1:]) for br in breaks)
        if not ok:
            continue
        pad = 0
        for L in lengths:
            up = min(x for x in uppers if x >= L)
            pad += up - L
        best = min(best, pad)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_optimal_buckets_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 14))
    lengths = rng.integers(1, 60, size=n).tolist()
    k = int(rng.integers(1, 5))
    breaks = [int(rng.integers(1, 60))] if seed % 3 == 0 else []
    need = len({sum(1 for b in breaks if b < x) for x in lengths})
    if k < need:
        k = need
    bk = optimal_buckets(lengths, k, breaks=breaks)
    pad = sum(int(bk.uppers[b]) - L for L, b in zip(lengths, bk.bucket_of))
    assert pad == brute_padding(lengths, k, breaks)
    assert bk.error == pytest.approx(pad / sum(lengths))
    # every length is at most its bucket's upper bound, and counts add up
    assert all(L <= bk.uppers[b] for L, b in zip(lengths, bk.bucket_of))
    assert bk.counts.sum() == n
    # no bucket straddles a break
    for b in range(bk.num_buckets):
        mem = [lengths[i] for i in bk.members(b)]
        for br in breaks:
            assert not (min(mem) <= br < max(mem))


@pytest.mark.parametrize("seed", range(6))
def test_bucketize_uses_the_fewest_buckets_meeting_the_bound(seed):
    rng = np.random.default_rng(100 + seed)
    lengths = rng.integers(1, 200, size=int(rng.integers(5, 12))).tolist()
    eps = float(rng.choice([0.0, 0.01, 0.05, 0.2]))
    bk = bucketize(lengths, max_error=eps)
    total = sum(lengths)
    assert bk.error <= eps + 1e-12
    k = bk.num_buckets
    if k > 1:  # one bucket fewer cannot meet the bound (brute force)
        assert brute_padding(lengths, k - 1) > eps * total + 1e-9


def test_bucketize_large_input_loop_path_and_atoms_agree_with_dense_path():
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 100_000, size=2700)  # > dense-matrix limit of distinct lengths
    breaks = [6484, 12968]
    loop = bucketize(lengths, max_error=0.0, breaks=breaks, max_buckets=5)
    # the same DP on the dense path (below the limit) via 2000 atoms can only be worse or equal
    atoms = bucketize(lengths, max_error=0.0, breaks=breaks, max_buckets=5, max_atoms=2000)
    assert loop.num_buckets == atoms.num_buckets == 5
    assert loop.error <= atoms.error + 1e-12
    for bk in (loop, atoms):
        assert (lengths <= bk.uppers[bk.bucket_of]).all()
        for b in range(bk.num_buckets):
            mem = lengths[bk.members(b)]
            for br in breaks:
                assert not (mem.min() <= br < mem.max())


def test_bucketing_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        bucketize([3, 0, 5])
    with pytest.raises(ValueError, match="non-empty"):
        bucketize([])
    with pytest.raises(ValueError, match="max_error"):
        bucketize([1, 2], max_error=-1)
