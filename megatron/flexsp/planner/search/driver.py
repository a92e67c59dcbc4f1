"""The improvement driver: constructive plan, then the phase table, the finishers and the other cuts.

Why one driver: every phase works on the same incumbent under the same ``Deadline`` and stops
at the same target (lower bound x (1 + gap)); the driver owns that loop and the record of what
ran (``extra["phases"]``, ``extra["phase_s"]``), and the moves only say how to improve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..deadline import Deadline
from ..micro_batch import Chunk, MBSolution, PlannerContext, milp_shots
from ..plan import Plan
from .common import Search, total
from .cuts import Candidate, constructive, safe_plan
from .fill import fill_pass
from .phases import PHASES
from .solve_cache import SolveCache

__all__ = ["plan_chunks"]

RUNNERS_UP_WITHIN = 1.05  # cuts this close to the best are searched in full before the phases
OTHER_CUTS = 3  # cuts kept for the end: re-solved, filled and compared
MILP_SHARE = 0.5  # of the time left, per MILP shot series
MILP_MIN_LEFT_S = 0.01


class _Timeline:
    """Which phases ran and for how long (the solver's ``extra``)."""

    def __init__(self, deadline: Deadline):
        self.deadline = deadline
        self.phases: list[str] = []
        self.marks: list[float] = []

    def enter(self, name: str) -> None:
        self.phases.append(name)
        self.marks.append(self.deadline.elapsed())

    def durations(self) -> dict[str, float]:
        ends = self.marks[1:] + [self.deadline.elapsed()]
        return {name: round(e - b, 5) for name, b, e in zip(self.phases, self.marks, ends)}


def _copy(mbs: list[Chunk]) -> list[Chunk]:
    return [Chunk(c.idx, c.sol) for c in mbs]


def _resolve(s: Search, mbs: list[Chunk]) -> None:
    """Re-solve every micro-batch (slowest first) at the cache's current level; keep what is faster."""
    for m in sorted(range(len(mbs)), key=lambda m: -mbs[m].sol.time_ms):
        if s.deadline.passed():
            break
        sol = s.solve(mbs[m].idx)
        if sol is not None and sol.time_ms < mbs[m].sol.time_ms - 1e-9:
            mbs[m].sol = sol


def _best_cut(
    s: Search, cands: list[Candidate], best: list[Chunk], info: dict, tl: _Timeline
) -> tuple[list[Chunk], list[tuple[str, list[Chunk]]]]:
    """The best cut and the runners-up within 5 % in full (which cut wins changes once the micro-batches are
    searched, and on large clusters the cut matters more than any later move); (best, the other cuts)."""
    others: list[tuple[str, list[Chunk]]] = []
    if not s.done(best):
        tl.enter("resolve")
        _resolve(s, best)
        first = cands[0][0]
        for t, name, cand in cands[1:3]:
            if s.deadline.passed() or t > RUNNERS_UP_WITHIN * first:
                break
            cand = _copy(cand)
            _resolve(s, cand)
            if total(cand) < total(best) - 1e-9:
                others.append((info["cut"], best))
                best, info["cut"] = cand, name
            else:
                others.append((name, cand))
    others += [(name, _copy(cand)) for _, name, cand in cands[1 + len(others) : 1 + OTHER_CUTS]]
    return best, others


def _improve(s: Search, best: list[Chunk], info: dict, tl: _Timeline) -> None:
    """Run the phase table on the incumbent."""
    for phase in PHASES:
        if not s.done(best) and phase.when(s, best, info):
            tl.enter(phase.name)
            info[phase.key] = info.get(phase.key, 0) + phase.move(s, best)


def _milp(s: Search, best: list[Chunk], info: dict) -> None:
    """MILP shots per micro-batch, slowest first, kept when better."""
    for m in sorted(range(len(best)), key=lambda m: -best[m].sol.time_ms):
        if s.deadline.left() < MILP_MIN_LEFT_S or total(best) <= s.target:
            break
        idx, sol = best[m]
        if sol.extra.get("exact_proven"):
            continue
        new = milp_shots(s.ctx, s.Ls[idx], s.taus[idx], sol, s.deadline.share(MILP_SHARE))
        if new.time_ms < sol.time_ms - 1e-9:
            best[m].sol = new
            s.solve.put(idx, new)
    info["milp_improved"] = sum(sol.method == "milp" for _, sol in best)


def _end_game(s: Search, best: list[Chunk], info: dict, tl: _Timeline, use_milp: bool) -> None:
    """Small clusters: an exact re-solve (the fill pass builds micro-batches by hand); else the MILP, if the
    budget is the clock (HiGHS under a time limit is not reproducible)."""
    if s.ctx.exact and not s.done(best):
        tl.enter("exact")
        _resolve(s, best)
    elif use_milp and not s.done(best) and not s.deadline.deterministic:
        tl.enter("milp")
        _milp(s, best, info)


def _alternatives(
    s: Search, best: list[Chunk], others: list[tuple[str, list[Chunk]]], info: dict, tl: _Timeline
) -> list[Chunk]:
    """The other cuts, re-solved in full and filled; the best plan of all. One is started only while the
    clock leaves as long as the incumbent's own full re-solve took (an alternative costs about that much:
    at 1024 GPUs ~0.5 s, which started at the deadline was overrun by as much)."""
    need = tl.durations().get("resolve", 0.0)
    for name, cand in others:
        if s.done(best) or (not s.deadline.deterministic and s.deadline.left() < need):
            break
        tl.enter("alt:" + name)
        cand = [Chunk(idx, s.solve(idx) or sol) for idx, sol in cand]
        fill_pass(s, cand)
        if total(cand) < total(best) - 1e-9:
            best, info["cut"] = cand, name + "+improved"
    return best


def plan_chunks(
    ctx: PlannerContext,
    lengths: np.ndarray,
    *,
    use_milp: bool,
    deadline: Deadline,
    lb: float,
    gap: float,
    seeds: Sequence[tuple[str, Plan]] = (),
) -> tuple[list[tuple[np.ndarray, MBSolution]], dict]:
    """Micro-batches of the batch (positions into ``lengths``): constructive, then improved; and the search's record."""
    order = np.argsort(-lengths, kind="stable")
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    Ls = lengths[order]
    taus = ctx.tau_table(Ls)
    s = Search(ctx, Ls, taus, SolveCache(ctx, Ls, taus, deadline), deadline, lb * (1.0 + gap))
    info: dict = {}
    cands = constructive(s, pos, seeds, info)
    if not cands:
        info["cut"] = "safe"
        return [(order[idx], sol) for idx, sol in safe_plan(ctx, Ls, taus)], info
    cands.sort(key=lambda x: x[0])
    _, name, best = cands[0]
    best = _copy(best)
    info["cut"] = name
    info["constructive_ms"] = round(total(best), 3)
    info["constructive_s"] = round(deadline.elapsed(), 4)
    s.solve.full = True
    tl = _Timeline(deadline)
    best, others = _best_cut(s, cands, best, info, tl)
    _improve(s, best, info, tl)
    _end_game(s, best, info, tl, use_milp)
    best = _alternatives(s, best, others, info, tl)
    info["phases"] = tl.phases
    info["phase_s"] = tl.durations()
    info["solves"] = s.solve.calls
    info["gap_reached"] = bool(total(best) <= s.target)
    return [(order[idx], sol) for idx, sol in best], info
