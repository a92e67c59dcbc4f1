"""Bucketing of sequence lengths, to shrink the MILP (FlexSP paper, Eq. 15-16).

The MILP decides how many sequences of each *bucket* go to each degree class instead of placing
every sequence, so its size depends on the bucket count, not the batch size. A bucket is a run
of consecutive sorted lengths represented by its largest length (so memory feasibility computed
on buckets is never optimistic). The padding error of a bucketing is

    E = sum_i (upper(bucket(i)) - L_i) / sum_i L_i,

and for a given bucket count K a dynamic programme over the sorted distinct lengths finds the
bucketing of least padding: dp[K][j] = min_{i<j} dp[K-1][i] + cost(i, j), with cost(i, j) the
padding of one bucket holding distinct lengths i..j-1. K grows from its minimum until E is at
most ``max_error`` (paper: the smallest bucket count meeting the error bound).

``breaks`` are lengths no bucket may straddle (a bucket never holds lengths both <= b and > b):
the planner passes the group capacities, so all lengths of a bucket share their feasible degrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Bucketing", "optimal_buckets", "bucketize"]

_MATRIX_LIMIT = 2500  # distinct lengths up to which the DP uses one dense (u+1) x (u+1) cost matrix


@dataclass
class Bucketing:
    uppers: np.ndarray  # int64 [K], increasing: the largest length of each bucket
    bucket_of: np.ndarray  # int64 [n]: bucket index of each input sequence (input order)
    counts: np.ndarray  # int64 [K]: sequences per bucket
    error: float  # padding error E (see module docstring)

    @property
    def num_buckets(self) -> int:
        return int(self.uppers.size)

    def members(self, b: int) -> np.ndarray:
        return np.flatnonzero(self.bucket_of == b)


def _prep(lengths: Sequence[int] | np.ndarray, breaks: Sequence[int], max_atoms: int | None = None):
    """Distinct sorted lengths (or at most ``max_atoms`` runs of them: bucket edges then fall only
    between runs) with prefix counts / tokens and the break segment of each."""
    L = np.asarray(lengths, dtype=np.int64)
    if L.ndim != 1 or L.size == 0:
        raise ValueError(f"bucketing: need a non-empty 1-D array of lengths, got shape {L.shape}")
    if (L <= 0).any():
        raise ValueError(f"bucketing: lengths must be positive, got {int(L.min())}")
    v, c = np.unique(L, return_counts=True)
    seg = np.searchsorted(np.sort(np.asarray(breaks, dtype=np.int64)), v, side="left")
    tok = c * v
    if max_atoms is not None and v.size > max_atoms:
        u = v.size
        edges = np.unique(
            np.concatenate(
                [np.linspace(0, u, max_atoms + 1).round().astype(np.int64), np.flatnonzero(np.diff(seg)) + 1, [0, u]]
            )
        )
        starts = edges[:-1]
        v = v[edges[1:] - 1]
        c = np.add.reduceat(c, starts)
        tok = np.add.reduceat(tok, starts)
        seg = seg[starts]
    pc = np.concatenate([[0], np.cumsum(c)]).astype(np.float64)
    pt = np.concatenate([[0], np.cumsum(tok)]).astype(np.float64)
    return L, v, c, pc, pt, seg


def _bucket_cost_row(i: np.ndarray | int, j: int, v, pc, pt, seg) -> np.ndarray:
    """Padding of one bucket holding distinct lengths i..j-1 (vector over i), inf if it straddles a break."""
    cost = (pc[j] - pc[i]) * v[j - 1] - (pt[j] - pt[i])
    return np.where(seg[i] == seg[j - 1], cost, np.inf)


class _DP:
    """Least-padding bucketings for K = 1, 2, ... over u distinct lengths, one K at a time."""

    def __init__(self, v, pc, pt, seg):
        self.v, self.pc, self.pt, self.seg = v, pc, pt, seg
        u = v.size
        self.u = u
        self.dp = np.full(u + 1, np.inf)
        self.dp[0] = 0.0
        self.parents: list[np.ndarray] = []
        self.mat = None
        if u <= _MATRIX_LIMIT:
            i = np.arange(u + 1)[:, None]
            j = np.arange(u + 1)[None, :]
            jj = np.maximum(j, 1)
            ii = np.minimum(i, u - 1)
            cost = (pc[jj] - pc[i]) * v[jj - 1] - (pt[jj] - pt[i])
            ok = (i < j) & (seg[ii] == seg[jj - 1])
            self.mat = np.where(ok, cost, np.inf)

    def step(self) -> float:
        """Advance to one more bucket; return the least padding (tokens) with exactly K buckets."""
        u = self.u
        if self.mat is not None:
            tot = self.dp[:, None] + self.mat
            par = np.argmin(tot, axis=0)
            new = tot[par, np.arange(u + 1)]
        else:
            new = np.full(u + 1, np.inf)
            par = np.zeros(u + 1, dtype=np.int64)
            for j in range(1, u + 1):
                i = np.arange(j)
                tot = self.dp[:j] + _bucket_cost_row(i, j, self.v, self.pc, self.pt, self.seg)
                k = int(np.argmin(tot))
                new[j], par[j] = tot[k], k
        self.dp = new
        self.parents.append(par)
        return float(new[u])

    def uppers(self) -> np.ndarray:
        j = self.u
        out = []
        for par in reversed(self.parents):
            out.append(self.v[j - 1])
            j = int(par[j])
        assert j == 0
        return np.asarray(out[::-1], dtype=np.int64)


def _finish(L: np.ndarray, uppers: np.ndarray, total: float, pad: float) -> Bucketing:
    b = np.searchsorted(uppers, L, side="left").astype(np.int64)
    counts = np.bincount(b, minlength=uppers.size).astype(np.int64)
    return Bucketing(uppers, b, counts, float(pad / total))


def optimal_buckets(lengths: Sequence[int] | np.ndarray, k: int, breaks: Sequence[int] = ()) -> Bucketing:
    """The least-padding bucketing into at most ``k`` buckets (exactly min(k, distinct lengths))."""
    L, v, c, pc, pt, seg = _prep(lengths, breaks)
    k = min(int(k), v.size)
    need = int(np.unique(seg).size)
    if k < need:
        raise ValueError(f"bucketing: {k} buckets cannot respect the {need - 1} break(s) the lengths straddle")
    dp = _DP(v, pc, pt, seg)
    pad = np.inf
    for _ in range(k):
        pad = dp.step()
    return _finish(L, dp.uppers(), float(pt[-1]), pad)


def bucketize(
    lengths: Sequence[int] | np.ndarray,
    max_error: float = 0.02,
    breaks: Sequence[int] = (),
    max_buckets: int | None = None,
    max_atoms: int | None = None,
) -> Bucketing:
    """Fewest buckets whose padding error is at most ``max_error`` (capped at ``max_buckets``).

    ``max_atoms`` bounds the DP's size on huge batches: the distinct lengths are first merged
    into that many runs of equal size (and at the breaks), and buckets are unions of runs.
    """
    if max_error < 0:
        raise ValueError(f"bucketing: max_error must be >= 0, got {max_error}")
    L, v, c, pc, pt, seg = _prep(lengths, breaks, max_atoms)
    total = float(pt[-1])
    need = int(np.unique(seg).size)
    cap = v.size if max_buckets is None else max(need, min(int(max_buckets), v.size))
    dp = _DP(v, pc, pt, seg)
    pad = np.inf
    for k in range(1, cap + 1):
        pad = dp.step()
        if k >= need and pad <= max_error * total + 1e-9:
            break
    return _finish(L, dp.uppers(), total, pad)
