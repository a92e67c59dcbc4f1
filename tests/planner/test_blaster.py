"""Sequence blaster DPs against brute force: min-max chunks, and the segmentation by chunk cost."""

import itertools

import numpy as np
import pytest

from megatron.flexsp.planner.blaster import ChunkEstimator, cut_points, min_max_chunks, segment
from megatron.flexsp.planner.bounds import seq_tau_table
from megatron.flexsp.planner.presets import preset


def all_cuts(n, m):
    for c in itertools.combinations(range(1, n), m - 1):
        yield [0, *c, n]


@pytest.mark.parametrize("seed", range(15))
def test_min_max_chunks_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    w = rng.integers(0, 50, size=n)
    m = int(rng.integers(1, n + 1))
    bounds, best = min_max_chunks(w, m)
    assert len(bounds) == m + 1 and bounds[0] == 0 and bounds[-1] == n
    assert all(a < b for a, b in zip(bounds[:-1], bounds[1:]))  # m non-empty chunks
    assert best == max(int(w[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
    ref = min(max(int(w[a:b].sum()) for a, b in zip(c[:-1], c[1:])) for c in all_cuts(n, m))
    assert best == ref


def test_min_max_chunks_rejects_bad_m():
    with pytest.raises(ValueError, match="1 <= m"):
        min_max_chunks([1, 2, 3], 4)


@pytest.mark.parametrize("seed", range(15))
def test_segment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    C = rng.uniform(1, 10, size=(n + 1, n + 1))
    C[rng.random(C.shape) < 0.2] = np.inf
    pts = np.arange(n + 1) if seed % 2 else np.unique(np.r_[0, rng.integers(0, n + 1, size=n // 2 + 1), n])

    def cost(i, j):
        return C[i, j]

    bounds, total = segment(pts, cost)
    ref = np.inf
    allowed = set(pts.tolist())
    for m in range(1, n + 1):
        for c in all_cuts(n, m):
            if not set(c) <= allowed:
                continue
            t = sum(C[a, b] for a, b in zip(c[:-1], c[1:]))
            if t < ref:
                ref = t
    if not np.isfinite(ref):
        assert bounds == [] and total == np.inf
    else:
        assert total == pytest.approx(ref)
        assert sum(C[a, b] for a, b in zip(bounds[:-1], bounds[1:])) == pytest.approx(ref)


def test_cut_points_keep_head_and_ends():
    L = np.arange(5000, 0, -1)
    p = cut_points(L, head=100, max_points=300)
    assert p[0] == 0 and p[-1] == 5000 and (np.diff(p) > 0).all()
    assert list(p[:101]) == list(range(101)) and p.size <= 302
    assert list(cut_points(np.arange(10, 0, -1))) == list(range(11))


def test_chunk_estimator_formula_and_memory_budget():
    cost = preset("gpt-7b", 64)
    degs = cost.allowed_degrees(64)
    L = np.array([150_000, 40_000, 9_000, 3_000, 1_000, 500])
    tau = seq_tau_table(L, cost, degs)
    est = ChunkEstimator(L, cost, 64, tau, degs, mem_frac=1.0)
    got = est.cost(np.arange(6), 6)
    # independent: from cost.group_time_ms of one sequence per group
    for i in range(6):
        toks = L[i:].sum()
        if toks > cost.tokens_per_gpu * 64:
            assert got[i] == np.inf
            continue
        gpu = [
            min(d * (cost.group_time_ms([x], d) - cost.compute.beta1_ms) for d in degs if cost.fits(x, d))
            for x in L[i:]
        ]
        ref = min(
            max(
                cost.group_time_ms([L[i]], d) - cost.compute.beta1_ms,
                (sum(gpu[1:]) + d * (cost.group_time_ms([L[i]], d) - cost.compute.beta1_ms)) / 64,
            )
            for d in degs
            if cost.fits(L[i], d)
        )
        assert got[i] == pytest.approx(cost.compute.beta1_ms + ref)
    tight = ChunkEstimator(L, cost, 64, tau, degs, mem_frac=0.3).cost(np.arange(6), 6)
    assert tight[0] == np.inf and np.isfinite(tight[-1])
