"""Sequence blaster: split a global batch into micro-batches (FlexSP paper, Alg. 1).

Sequences are sorted longest first and cut into consecutive chunks, one micro-batch each, so a
micro-batch holds sequences of similar length, whose groups balance well. Two ways to cut:

* ``min_max_chunks`` (the paper's): exactly M chunks minimising the largest chunk's token
  count, M tried from the memory lower bound upward;
* ``segment``: a dynamic programme over cut points minimising the *sum of estimated
  micro-batch times* (any M); ``chunk_estimates`` gives the estimate (beta1 + the larger of the
  chunk's GPU-ms over all GPUs and the time of its longest sequence at the best degree), and
  infinity for chunks over a memory budget, so M follows from memory and balance together.

The planner evaluates the candidate cuts with its per-micro-batch solver and keeps the best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .costmodel import CostModel

__all__ = ["min_max_chunks", "segment", "segment_matrix", "cut_points", "ChunkEstimator"]


def _greedy_chunks(w: np.ndarray, cap: int) -> list[int]:
    """Start indices of the fewest chunks with sums <= cap (greedy is optimal for this)."""
    starts = [0]
    acc = 0
    for i, x in enumerate(w.tolist()):
        if acc + x > cap:
            starts.append(i)
            acc = 0
        acc += x
    return starts


def min_max_chunks(weights: Sequence[int] | np.ndarray, m: int) -> tuple[list[int], int]:
    """Cut ``weights`` (in order) into exactly ``m`` non-empty consecutive chunks minimising the largest sum.

    Returns (bounds, best) with bounds = [0, c_1, ..., n] (chunk k is weights[bounds[k]:bounds[k+1]]).
    Exact: bisection over the integer answer with the greedy feasibility test, then cuts are
    added inside chunks until there are m (splitting never raises the largest sum).
    """
    w = np.asarray(weights, dtype=np.int64)
    n = int(w.size)
    if not 1 <= m <= n:
        raise ValueError(f"min_max_chunks: need 1 <= m <= number of items ({n}), got m={m}")
    if (w < 0).any():
        raise ValueError("min_max_chunks: weights must be non-negative")
    lo, hi = int(w.max()), int(w.sum())
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy_chunks(w, mid)) <= m:
            hi = mid
        else:
            lo = mid + 1
    starts = _greedy_chunks(w, lo)
    cuts = set(starts)
    i = n - 1
    while len(cuts) < m:  # split: add the latest cut points not yet used
        if i not in cuts and i > 0:
            cuts.add(i)
        i -= 1
    bounds = sorted(cuts) + [n]
    best = max(int(w[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
    return bounds, best


def segment(
    points: Sequence[int] | np.ndarray, cost: Callable[[np.ndarray, int], np.ndarray]
) -> tuple[list[int], float]:
    """Cut items 0..n-1 into consecutive chunks, cutting only at ``points``, minimising the sum of chunk costs.

    ``points`` are the allowed cut positions, increasing, from 0 to n (both included).
    ``cost(i, j)`` returns, for an array i of start positions (< j), the cost of each chunk
    [i, j) (inf if not allowed). DP: f[j] = min_i f[i] + cost(i, j). Returns (bounds [0, ..., n],
    total); bounds is empty and total inf if no finite segmentation exists.
    """
    pts = np.asarray(points, dtype=np.int64)
    if pts.size < 2 or pts[0] != 0 or (np.diff(pts) <= 0).any():
        raise ValueError("segment: points must increase strictly from 0 to n")
    m = pts.size
    f = np.full(m, np.inf)
    f[0] = 0.0
    par = np.zeros(m, dtype=np.int64)
    for q in range(1, m):
        c = np.asarray(cost(pts[:q], int(pts[q])), dtype=np.float64)
        if c.shape != (q,):
            raise ValueError(f"segment: cost(i, {pts[q]}) must have shape ({q},), got {c.shape}")
        tot = f[:q] + c
        k = int(np.argmin(tot))
        f[q], par[q] = tot[k], k
    return _backtrack(pts, f, par)


def _backtrack(pts: np.ndarray, f: np.ndarray, par: np.ndarray) -> tuple[list[int], float]:
    """The cut points of the DP's best segmentation (from the parents), and its cost; ([], inf) if none."""
    m = pts.size
    if not np.isfinite(f[-1]):
        return [], float("inf")
    out = [m - 1]
    while out[-1] > 0:
        out.append(int(par[out[-1]]))
    return [int(pts[q]) for q in reversed(out)], float(f[-1])


def segment_matrix(points: Sequence[int] | np.ndarray, cost: np.ndarray) -> tuple[list[int], float]:
    """``segment`` with the chunk costs given as a matrix: cost[a, b] for the chunk [points[a], points[b]).

    The planner computes the whole matrix in a few vectorised passes (``ChunkEstimator.matrix``)
    and then runs the DP for several memory budgets, instead of one Python call per end point.
    """
    pts = np.asarray(points, dtype=np.int64)
    m = pts.size
    if m < 2 or cost.shape != (m, m):
        raise ValueError(f"segment_matrix: need >= 2 points and a ({m}, {m}) cost matrix, got {cost.shape}")
    f = np.full(m, np.inf)
    f[0] = 0.0
    par = np.zeros(m, dtype=np.int64)
    for q in range(1, m):
        tot = f[:q] + cost[:q, q]
        k = int(np.argmin(tot))
        f[q], par[q] = tot[k], k
    return _backtrack(pts, f, par)


def cut_points(lengths_desc: np.ndarray, head: int = 384, max_points: int = 768) -> np.ndarray:
    """Allowed cut positions: every position among the ``head`` longest sequences, then evenly spaced.

    Where a cut falls among many short sequences matters little (the planner moves short
    sequences between micro-batches afterwards), so the DP stays O(points^2).
    """
    n = int(np.asarray(lengths_desc).size)
    if n + 1 <= max_points:
        return np.arange(n + 1)
    h = min(head, n)
    rest = np.linspace(h, n, max(2, max_points - h)).round().astype(np.int64)
    return np.unique(np.concatenate([np.arange(h + 1), rest, [n]]))


class ChunkEstimator:
    """Estimated time of a micro-batch made of sorted-descending sequences [i, j).

    estimate(i, j) = beta1 + min over degrees d of the head (longest) sequence i of
    max(tau(i, d), (G(i, j) - g_i + d * tau(i, d)) / world_size), where G sums the cheapest
    GPU-ms g of the chunk; inf when the chunk holds more than ``mem_frac`` of all ranks' tokens.
    """

    def __init__(
        self,
        lengths_desc: np.ndarray,
        cost: CostModel,
        world_size: int,
        tau: np.ndarray,
        degrees: Sequence[int],
        mem_frac: float = 1.0,
    ):
        L = np.asarray(lengths_desc, dtype=np.int64)
        self.n = int(L.size)
        self.ws = world_size
        self.beta1 = cost.compute.beta1_ms
        d = np.asarray(degrees, dtype=np.float64)
        self.tau = tau
        self.dtau = tau * d[None, :]  # GPU-ms of i at each degree (inf if infeasible)
        self.g = self.dtau.min(axis=1)  # cheapest GPU-ms
        self.G = np.concatenate([[0.0], np.cumsum(self.g)])
        self.T = np.concatenate([[0], np.cumsum(L)])
        self.full_budget = float(cost.tokens_per_gpu * world_size)
        self.budget = mem_frac * self.full_budget
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def estimate(self, i: np.ndarray, j: int) -> np.ndarray:
        """Estimated time of chunks [i, j) ignoring memory (cached per j: several budgets share it)."""
        key = (j, i.size, int(i[0]) if i.size else -1)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        rest = (self.G[j] - self.G[i] - self.g[i])[:, None]
        est = self.beta1 + np.maximum(self.tau[i], (rest + self.dtau[i]) / self.ws).min(axis=1)
        self._cache[key] = est
        return est

    def cost(self, i: np.ndarray, j: int, mem_frac: float | None = None) -> np.ndarray:
        budget = self.budget if mem_frac is None else mem_frac * self.full_budget
        est = self.estimate(i, j)
        return np.where(self.T[j] - self.T[i] <= budget + 1e-9, est, np.inf)

    def matrix(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(estimate, tokens) of every chunk [points[a], points[b]), a < b, as [m, m] matrices (inf below the diagonal).

        Same formula as ``estimate``, one vectorised pass per degree.
        """
        pts = np.asarray(points, dtype=np.int64)
        i = pts[:-1]
        best = np.full((pts.size, pts.size), np.inf)
        rest = self.G[pts][None, :] - self.G[i][:, None] - self.g[i][:, None]  # [m-1, m]
        for k in range(self.tau.shape[1]):
            v = np.maximum(self.tau[i, k][:, None], (rest + self.dtau[i, k][:, None]) / self.ws)
            np.minimum(best[:-1], v, out=best[:-1])
        upper = np.triu(np.ones((pts.size, pts.size), dtype=bool), 1)
        est = np.where(upper, self.beta1 + best, np.inf)
        tok = (self.T[pts][None, :] - self.T[pts][:, None]).astype(np.float64)
        return est, tok
