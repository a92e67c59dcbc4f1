"""Pair search: two micro-batches merged into one, or their union cut anew at any point.

Why: what single moves cannot do. Merging two micro-batches saves a beta1 but takes several
uphill moves to get there, and trading several sequences at once rebalances a pair whose
every single move is uphill. Candidates are dismissed by ``MBBounds`` before any solve.
"""

from __future__ import annotations

import numpy as np

from ..micro_batch import Chunk
from .common import MBBounds, Search, total

__all__ = ["pair_search"]


def _best_resplit(s: Search, bnd: MBBounds, a: Chunk, b: Chunk) -> tuple[float, list[Chunk]] | None:
    """The union of a and b as one micro-batch, or cut in two, when that beats their sum (the best such)."""
    (ia, sa), (ib, sb) = a, b
    old = sa.time_ms + sb.time_ms
    budget = s.budget
    u = np.sort(np.concatenate([ia, ib]))  # positions: longest first
    tok = np.cumsum(s.Ls[u])
    best = None
    if tok[-1] <= budget and bnd.after(bnd.summary(u), None, None) < old - 1e-9:
        su = s.solve(u)
        if su is not None and su.time_ms < old - 1e-9:
            best = (su.time_ms, [Chunk(u, su)])
    for i in range(1, u.size):
        if tok[i - 1] > budget:
            break
        if tok[-1] - tok[i - 1] > budget:
            continue
        left, right = u[:i], u[i:]
        if np.array_equal(np.sort(ia), left) or np.array_equal(np.sort(ib), left):
            continue
        lim = best[0] if best is not None else old
        if bnd.after(bnd.summary(left), None, None) + bnd.after(bnd.summary(right), None, None) >= lim - 1e-9:
            continue
        sl = s.solve(left)
        if sl is None:
            continue
        sr = s.solve(right)
        if sr is not None and sl.time_ms + sr.time_ms < lim - 1e-9:
            best = (sl.time_ms + sr.time_ms, [Chunk(left, sl), Chunk(right, sr)])
    return best


def _first_resplit(s: Search, mbs: list[Chunk], bnd: MBBounds) -> bool | None:
    """Apply the first pair (slowest first) that a re-split improves: True; False if none; None at the deadline."""
    for a in range(len(mbs)):
        for b in range(a + 1, len(mbs)):
            if s.deadline.passed():
                return None
            best = _best_resplit(s, bnd, mbs[a], mbs[b])
            if best is not None:
                del mbs[b]
                del mbs[a]
                mbs.extend(best[1])
                return True
    return False


def pair_search(s: Search, mbs: list[Chunk]) -> int:
    """Re-split pairs of micro-batches while that improves; returns the number of changes."""
    changes = 0
    bnd = MBBounds(s.ctx, s.Ls, s.taus)
    while not s.deadline.passed() and total(mbs) > s.target:
        mbs.sort(key=lambda c: -c.sol.time_ms)
        if not _first_resplit(s, mbs, bnd):
            break
        changes += 1
    return changes
