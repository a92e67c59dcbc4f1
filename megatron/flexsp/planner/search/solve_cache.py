"""Micro-batch solves of the global search, cached by the set of positions they hold.

Why a cache: every move re-solves the micro-batches it touches, and the search comes back to
the same sets of sequences again and again (a move undone, a swap tried from both sides).
Each solve also counts one unit of the ``Deadline``'s work budget.
"""

from __future__ import annotations

import numpy as np

from ..deadline import Deadline
from ..micro_batch import MBSolution, PlannerContext, solve_micro_batch

__all__ = ["SolveCache"]

_GIVEN, _QUICK, _FULL = 0, 1, 2  # how an entry was solved: from outside (seed, MILP), quick, full or exact


def _remap(sol: MBSolution, pos: dict[int, int], order: list[int]) -> MBSolution:
    """``sol`` with members renumbered: member j (indexing ``order``) becomes ``pos[order[j]]``."""
    return MBSolution(
        list(sol.degrees),
        [[pos[order[j]] for j in m] for m in sol.members],
        sol.time_ms,
        sol.method,
        dict(sol.extra),
        sol.options,
    )


class SolveCache:
    """Micro-batch solves of positions in the sorted batch, cached by the set of positions.

    Callers pass positions in any order and get members indexing *their* order. Each entry
    records how it was solved; ``full`` switches from quick to full, and an entry below the
    level asked for is re-solved once (the better of both is kept).
    """

    def __init__(self, ctx: PlannerContext, Ls: np.ndarray, taus: np.ndarray, deadline: Deadline):
        self.ctx, self.Ls, self.taus, self.deadline = ctx, Ls, taus, deadline
        self.full = False
        self.budget = ctx.cost.tokens_per_gpu * ctx.world_size
        self.cache: dict[tuple[int, ...], tuple[int, list[int], MBSolution | None]] = {}
        self.calls = 0

    def _solve(self, kl: list[int]) -> MBSolution | None:
        self.calls += 1
        self.deadline.tick()
        key = np.asarray(kl, dtype=np.int64)
        if int(self.Ls[key].sum()) > self.budget:  # more tokens than all ranks hold: no solve needed
            return None
        return solve_micro_batch(self.ctx, self.Ls[key], self.taus[key], quick=not self.full, deadline=self.deadline)

    def __call__(self, idx: np.ndarray) -> MBSolution | None:
        il = idx.tolist()
        kl = sorted(il)  # plain lists: micro-batches are small, numpy calls cost more
        kt = tuple(kl)
        hit = self.cache.get(kt)
        level = _FULL if (self.full or self.ctx.exact) else _QUICK
        if hit is None or hit[0] < level:
            sol = self._solve(kl)
            if hit is not None and hit[2] is not None and (sol is None or hit[2].time_ms <= sol.time_ms):
                sol = hit[2]
            hit = (level, kl, sol)
            self.cache[kt] = hit
        _, kl, sol = hit
        if sol is None or il == kl:
            return sol
        return _remap(sol, {v: i for i, v in enumerate(il)}, kl)

    def put(self, idx: np.ndarray, sol: MBSolution) -> None:
        """Remember a better solution found elsewhere (MILP, seeds) for this set of positions."""
        il = idx.tolist()
        kl = sorted(il)
        kt = tuple(kl)
        hit = self.cache.get(kt)
        if hit is not None and hit[2] is not None and hit[2].time_ms <= sol.time_ms:
            return
        if il != kl:
            sol = _remap(sol, {v: i for i, v in enumerate(kl)}, il)
        self.cache[kt] = (hit[0] if hit is not None else _GIVEN, kl, sol)
