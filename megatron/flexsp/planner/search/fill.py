"""Fill move: slower micro-batches take sequences into their idle room; the donors are re-solved.

Why: a micro-batch whose makespan is set by a few long sequences has groups with spare time
and memory; filling them with sequences of faster micro-batches leaves its makespan unchanged
and shortens the donors (or empties them: one micro-batch less). Kept only when the total
improves.
"""

from __future__ import annotations

import numpy as np

from ..micro.context import EPS as _EPS
from ..micro_batch import Chunk, MBSolution, PlannerContext
from .common import Search

__all__ = ["fill_pass"]


def _group_arrays(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, sol: MBSolution):
    """Per-group degree index, load (sum tau), tokens of a micro-batch solution."""
    gk = np.array(ctx.options_of(sol), dtype=np.int64)
    load = np.array([tau[m, k].sum() if m else 0.0 for m, k in zip(sol.members, gk)])
    tok = np.array([L[m].sum() if m else 0.0 for m in sol.members], dtype=np.float64)
    return gk, load, tok


def _pulls(s: Search, mbs: list[Chunk], a: int) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Which sequences of the faster micro-batches fit a's idle room: (pool position, group of a), pool, owner."""
    Ls, taus = s.Ls, s.taus
    idx_a, sol_a = mbs[a]
    gk, load, tok = _group_arrays(s.ctx, Ls[idx_a], taus[idx_a], sol_a)
    tslack = sol_a.time_ms - s.ctx.beta1 - load
    mslack = s.ctx.caps[gk] - tok
    donors = range(a + 1, len(mbs))
    pool = np.concatenate([mbs[b].idx for b in donors])
    owner = np.concatenate([np.full(mbs[b].idx.size, b) for b in donors])
    order = np.argsort(-Ls[pool], kind="stable")
    pulled: list[tuple[int, int]] = []
    min_need = np.inf
    for q in order.tolist():
        i = int(pool[q])
        if Ls[i] < min_need and not (mslack >= Ls[i]).any():
            break
        tt = taus[i, gk]
        ok = (mslack >= Ls[i] - _EPS) & (tslack >= tt - _EPS)
        if not ok.any():
            continue
        g = int(np.argmin(np.where(ok, tslack - tt, np.inf)))  # best fit in time
        tslack[g] -= tt[g]
        mslack[g] -= Ls[i]
        pulled.append((q, g))
    return pulled, pool, owner


def _resolved_donors(
    s: Search, mbs: list[Chunk], touched: list[int], take: set[int], new_total: float
) -> tuple[float, dict[int, Chunk | None]] | None:
    """The donors without the pulled sequences, re-solved (None: emptied), and ``new_total`` plus their times;
    None when one cannot be solved."""
    out: dict[int, Chunk | None] = {}
    for b in touched:
        rest = np.array([i for i in mbs[b].idx.tolist() if i not in take], dtype=np.int64)
        if rest.size == 0:
            out[b] = None
            continue
        sol = s.solve(rest)
        if sol is None:
            return None
        out[b] = Chunk(rest, sol)
        new_total += sol.time_ms
    return new_total, out


def _try_fill(s: Search, mbs: list[Chunk], a: int) -> bool:
    """Fill micro-batch a from the faster ones (after it) when the total drops; True when applied."""
    idx_a, sol_a = mbs[a]
    T = sol_a.time_ms
    pulled, pool, owner = _pulls(s, mbs, a)
    if not pulled:
        return False
    # tentative: new a (same makespan) and re-solved donors
    take = {int(pool[q]) for q, _ in pulled}
    new_members = [list(m) for m in sol_a.members]
    new_idx = list(idx_a.tolist())
    for q, g in pulled:
        new_members[g].append(len(new_idx))
        new_idx.append(int(pool[q]))
    touched = sorted({int(owner[q]) for q, _ in pulled})
    old_total = T + sum(mbs[b].sol.time_ms for b in touched)
    donors = _resolved_donors(s, mbs, touched, take, T)
    if donors is None or donors[0] >= old_total - 1e-6:
        return False
    sol_new = MBSolution(list(sol_a.degrees), new_members, T, sol_a.method, dict(sol_a.extra), sol_a.options)
    mbs[a] = Chunk(np.asarray(new_idx, dtype=np.int64), sol_new)
    for b in sorted(touched, reverse=True):
        if donors[1][b] is None:
            del mbs[b]
        else:
            mbs[b] = donors[1][b]
    return True


def fill_pass(s: Search, mbs: list[Chunk]) -> int:
    """Pull sequences into the idle room of slower micro-batches; re-solve the micro-batches they left.

    Returns the number of accepted pulls.
    """
    accepted = 0
    a = 0
    while a < len(mbs):
        if s.deadline.passed():
            break
        mbs.sort(key=lambda c: -c.sol.time_ms)
        if a + 1 >= len(mbs):  # no faster micro-batch to take from
            break
        if _try_fill(s, mbs, a):
            accepted += 1  # same a again: its room may be used by what remains
        else:
            a += 1
    return accepted
