"""Polish move: move or swap the longest sequences between micro-batches with few sequences.

Why: consecutive cuts of the sorted batch put the longest sequences together; which of them
share a micro-batch decides how well their groups balance, so each of the ``top`` longest
sequences of a small micro-batch is tried in another small one (and swapped with its longest
shorter sequence), both re-solved, and changes that lower the sum are kept. Bounded by
``max_evals`` re-solved pairs and by the deadline.
"""

from __future__ import annotations

import numpy as np

from ..micro_batch import Chunk
from .common import Search, replace_pair

__all__ = ["polish"]

MAX_EVALS = 120  # re-solved pairs per polish
SMALL = 48  # micro-batches of at most this many sequences are the batch's head
TOP = 6  # longest sequences of a micro-batch that are tried elsewhere

_Best = tuple[float, np.ndarray, object, np.ndarray, object]


def _pair_change(
    s: Search, ia: np.ndarray, ib: np.ndarray, i: int, old: float, best: _Best | None
) -> tuple[_Best | None, int]:
    """Sequence ``i`` of a moved to b, then swapped with b's longest shorter one: the better of them and ``best``,
    and the number of evaluations made."""
    Ls, solve = s.Ls, s.solve
    evals = 1
    na = ia[ia != i]
    nb = np.append(ib, i)
    sa = solve(na) if na.size else None
    sb = solve(nb)
    if sb is not None and (sa is not None or na.size == 0):
        t = (sa.time_ms if sa is not None else 0.0) + sb.time_ms
        if t < old - 1e-6 and (best is None or t < best[0]):
            best = (t, na, sa, nb, sb)
    cand = ib[Ls[ib] < Ls[i]]
    if cand.size:
        j = int(cand[np.argmax(Ls[cand])])
        na2 = np.append(ia[ia != i], j)
        nb2 = np.append(ib[ib != j], i)
        evals += 1
        sa2, sb2 = solve(na2), solve(nb2)
        if sa2 is not None and sb2 is not None:
            t = sa2.time_ms + sb2.time_ms
            if t < old - 1e-6 and (best is None or t < best[0]):
                best = (t, na2, sa2, nb2, sb2)
    return best, evals


def _round(s: Search, mbs: list[Chunk], evals: int, max_evals: int, small: int, top: int) -> tuple[bool, int]:
    """One scan of the head micro-batches; applies the first pair that improves. (improved, evals)."""
    heads = [m for m in range(len(mbs)) if mbs[m].idx.size <= small]
    heads.sort(key=lambda m: -mbs[m].sol.time_ms)
    for a in heads:
        ia = mbs[a].idx
        longest = ia[np.argsort(-s.Ls[ia], kind="stable")][:top]
        for b in heads:
            if b == a or evals >= max_evals or s.deadline.passed():
                continue
            ib = mbs[b].idx
            old = mbs[a].sol.time_ms + mbs[b].sol.time_ms
            best = None
            for i in longest.tolist():
                best, n = _pair_change(s, ia, ib, i, old, best)
                evals += n
            if best is not None:
                _, na, sa, nb, sb = best
                replace_pair(mbs, a, Chunk(na, sa), b, Chunk(nb, sb))
                return True, evals
    return False, evals


def polish(s: Search, mbs: list[Chunk], max_evals: int = MAX_EVALS, small: int = SMALL, top: int = TOP) -> int:
    """Improve the head of the batch by moves and swaps of its longest sequences; returns the changes accepted."""
    evals = 0
    accepted = 0
    improved = True
    while improved and evals < max_evals and not s.deadline.passed():
        improved, evals = _round(s, mbs, evals, max_evals, small, top)
        accepted += improved
    return accepted
