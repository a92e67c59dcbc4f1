"""Move search: single sequences to other micro-batches, or swaps of two, while the re-solved sum drops.

Why: this is where small clusters gain most. For each sequence of a slow micro-batch (longest
first), its removal's gain is compared with the least possible cost of adding it elsewhere
(``MBBounds``, memory), so most receivers are dismissed without a solve; the best improving move
is applied and the scan restarts. When no single move helps, swaps of two sequences of
different micro-batches are tried the same way (a long sequence for a shorter one: this
rebalances pairs that no single move can). Stops at the deadline, at the target (lower bound
times 1 + gap), or at a local optimum.
"""

from __future__ import annotations

import numpy as np

from ..micro_batch import Chunk
from .common import MBBounds, Search, replace_pair, total

__all__ = ["move_search"]

_APPLIED, _NONE, _STOPPED = "applied", "none", "stopped"
_Summary = tuple[float, float, float, int, int]


def _best_receiver(
    s: Search, mbs: list[Chunk], bnd: MBBounds, sms: list[_Summary], recv: list[int], i: int, gain: float
) -> tuple[float, int, np.ndarray, object] | None:
    """The receiver whose re-solved time grows least (below ``gain``) when it takes sequence ``i``."""
    best = None
    for b in recv:
        ib, sb = mbs[b]
        if bnd.after(sms[b], None, i) - sb.time_ms >= gain - 1e-9:
            continue
        nb = np.append(ib, i)
        snb = s.solve(nb)
        if snb is None:
            continue
        delta = gain - (snb.time_ms - sb.time_ms)
        if delta > 1e-9 and (best is None or delta > best[0]):
            best = (delta, b, nb, snb)
    return best


def _single_moves(s: Search, mbs: list[Chunk], bnd: MBBounds, sms: list[_Summary]) -> str:
    """Apply the first improving move found (slowest micro-batch, longest sequence first)."""
    Lf, budget = bnd.L, s.budget
    for a in range(len(mbs)):
        ia, sa = mbs[a]
        for i in ia[np.argsort(-s.Ls[ia], kind="stable")].tolist():
            if s.deadline.passed():
                return _STOPPED
            rest = ia[ia != i]
            # bounds first: the most removing i can gain, the least adding it elsewhere costs
            top = sa.time_ms - (bnd.after(sms[a], i, None) if rest.size else 0.0)
            recv = [
                b
                for b in range(len(mbs))
                if b != a
                and sms[b][4] + Lf[i] <= budget
                and bnd.after(sms[b], None, i) - mbs[b].sol.time_ms < top - 1e-9
            ]
            if not recv:
                continue
            sr = s.solve(rest) if rest.size else None
            if rest.size and sr is None:
                continue
            gain = sa.time_ms - (sr.time_ms if sr is not None else 0.0)
            if gain <= 1e-9:
                continue
            best = _best_receiver(s, mbs, bnd, sms, recv, i, gain)
            if best is not None:
                _, b, nb, snb = best
                replace_pair(mbs, a, Chunk(rest, sr), b, Chunk(nb, snb))
                return _APPLIED
    return _NONE


def _swap_pair(s: Search, mbs: list[Chunk], bnd: MBBounds, sms: list[_Summary], a: int, b: int) -> str:
    """Apply the first swap of a sequence of a with one of b that lowers their re-solved sum."""
    Lf, budget = bnd.L, s.budget
    (ia, sa), (ib, sb) = mbs[a], mbs[b]
    old = sa.time_ms + sb.time_ms
    for i in ia.tolist():
        if s.deadline.passed():
            return _STOPPED
        for j in ib.tolist():
            if Lf[i] == Lf[j]:
                continue
            if (
                sms[a][4] - Lf[i] + Lf[j] > budget
                or sms[b][4] - Lf[j] + Lf[i] > budget
                or bnd.after(sms[a], i, j) + bnd.after(sms[b], j, i) >= old - 1e-9
            ):
                continue
            na = np.append(ia[ia != i], j)
            nb = np.append(ib[ib != j], i)
            sna = s.solve(na)
            if sna is None or sna.time_ms + bnd.after(sms[b], j, i) >= old - 1e-9:
                continue
            snb = s.solve(nb)
            if snb is not None and sna.time_ms + snb.time_ms < old - 1e-9:
                mbs[a] = Chunk(na, sna)
                mbs[b] = Chunk(nb, snb)
                return _APPLIED
    return _NONE


def _swaps(s: Search, mbs: list[Chunk], bnd: MBBounds, sms: list[_Summary]) -> str:
    for a in range(len(mbs)):
        for b in range(a + 1, len(mbs)):
            r = _swap_pair(s, mbs, bnd, sms, a, b)
            if r != _NONE:
                return r
    return _NONE


def move_search(s: Search, mbs: list[Chunk]) -> int:
    """Single moves, else swaps, until none improves; returns the number applied."""
    moves = 0
    bnd = MBBounds(s.ctx, s.Ls, s.taus)
    while not s.deadline.passed():
        mbs.sort(key=lambda c: -c.sol.time_ms)
        if total(mbs) <= s.target:
            break
        sms = [bnd.summary(idx) for idx, _ in mbs]
        r = _single_moves(s, mbs, bnd, sms)
        if r == _NONE:
            r = _swaps(s, mbs, bnd, sms)
        if r != _APPLIED:
            break
        moves += 1
    return moves
