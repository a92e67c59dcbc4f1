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

from typing import Callable, Sequence

import numpy as np

from .costmodel import CostModel

__all__ = ["min_max_chunks", "segment", "ChunkEstimator"]


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


def segment(n: int, cost_to: Callable[[int], np.ndarray], max_chunks: int | None = None) -> tuple[list[int], float]:
    """Cut items 0..n-1 into consecutive chunks minimising the sum of chunk costs.

    ``cost_to(j)`` returns a vector c with c[i] = cost of the chunk [i, j) for i in 0..j-1 (inf if not
    allowed). DP: f[j] = min_i f[i] + c[i]. Returns (bounds [0, ..., n], total cost); total is
    inf if no finite segmentation exists. ``max_chunks`` is unused by the DP but kept for callers
    that want to bound M: it raises if the optimum needs more chunks.
    """
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    par = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        c = np.asarray(cost_to(j), dtype=np.float64)
        if c.shape != (j,):
            raise ValueError(f"segment: cost_to({j}) must have shape ({j},), got {c.shape}")
        tot = f[:j] + c
        k = int(np.argmin(tot))
        f[j], par[j] = tot[k], k
    if not np.isfinite(f[n]):
        return [], float("inf")
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(int(par[bounds[-1]]))
    bounds.reverse()
    if max_chunks is not None and len(bounds) - 1 > max_chunks:
        raise ValueError(f"segment: optimum uses {len(bounds) - 1} chunks, more than {max_chunks}")
    return bounds, float(f[n])


class ChunkEstimator:
    """Estimated time of a micro-batch made of sorted-descending sequences [i, j).

    estimate(i, j) = beta1 + min over degrees d of the head (longest) sequence i of
    max(tau(i, d), (G(i, j) - g_i + d * tau(i, d)) / world_size), where G sums the cheapest
    GPU-ms g of the chunk; inf when the chunk holds more than ``mem_frac`` of all ranks' tokens.
    """

    def __init__(self, lengths_desc: np.ndarray, cost: CostModel, world_size: int, tau: np.ndarray,
                 degrees: Sequence[int], mem_frac: float = 1.0):
        L = np.asarray(lengths_desc, dtype=np.int64)
        self.n = int(L.size)
        self.ws = world_size
        self.beta1 = cost.compute.beta1_ms
        d = np.asarray(degrees, dtype=np.float64)
        self.tau = tau
        self.dtau = tau * d[None, :]                     # GPU-ms of i at each degree (inf if infeasible)
        self.g = self.dtau.min(axis=1)                   # cheapest GPU-ms
        self.G = np.concatenate([[0.0], np.cumsum(self.g)])
        self.T = np.concatenate([[0], np.cumsum(L)])
        self.budget = mem_frac * cost.tokens_per_gpu * world_size

    def cost_to(self, j: int) -> np.ndarray:
        i = np.arange(j)
        out = np.full(j, np.inf)
        lo = int(np.searchsorted(self.T, self.T[j] - self.budget - 1e-9, side="left"))
        if lo >= j:
            return out
        i = i[lo:]
        rest = (self.G[j] - self.G[i] - self.g[i])[:, None]
        est = np.maximum(self.tau[i], (rest + self.dtau[i]) / self.ws).min(axis=1)
        out[lo:] = self.beta1 + est
        return out
