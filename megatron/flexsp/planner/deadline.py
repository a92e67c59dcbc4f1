"""One budget for a whole solve: every phase of the planner asks the same ``Deadline``.

Why: a planner that runs beside training steals CPU from it, so its time limit must bound the
whole solve (constructive plan, improvement phases, the baseline comparison in ``api``), not
just the MILP. Phases take a share of what is left (``share``), so an early phase cannot starve
the later ones, and loops poll ``passed()`` between units of work that take at most a few
milliseconds.

A wall-clock budget makes plans depend on the CPU the planner got. Where plans must be
reproducible (a resumed run must plan exactly as the uninterrupted one did), the budget is a
number of micro-batch solves instead (``work_limit``): the clock is then not consulted at all,
and the same batch always gets the same plan, on any machine.
"""

from __future__ import annotations

import math
import time

__all__ = ["Deadline"]


class Deadline:
    """An absolute ``time.perf_counter()`` instant and/or a budget of work units (micro-batch solves).

    ``start`` is when the solve began. Shares made by ``share`` count work on the same counter.
    """

    def __init__(self, end: float, start: float, work_limit: float = math.inf, counter: list[int] | None = None):
        self.end = end
        self.start = start
        self.work_limit = work_limit
        self._work = counter if counter is not None else [0]

    @classmethod
    def after(cls, seconds: float, start: float | None = None, work_limit: int | None = None) -> Deadline:
        """``seconds`` from now; with ``work_limit`` the clock is ignored and only work counts."""
        t0 = time.perf_counter() if start is None else start
        if work_limit is not None:
            return cls(math.inf, t0, float(work_limit))
        return cls(t0 + max(0.0, float(seconds)), t0)

    @property
    def deterministic(self) -> bool:
        """True when only work counts (no decision depends on the clock)."""
        return self.end == math.inf

    @property
    def work(self) -> int:
        return self._work[0]

    def tick(self, n: int = 1) -> None:
        """Count ``n`` units of work (micro-batch solves)."""
        self._work[0] += n

    def left(self) -> float:
        """Seconds left (infinite for a work budget)."""
        return self.end - time.perf_counter()

    def passed(self) -> bool:
        return self._work[0] >= self.work_limit or time.perf_counter() >= self.end

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def share(self, frac: float) -> Deadline:
        """An earlier budget: ``frac`` of the time and of the work left from now (never beyond this one)."""
        now = time.perf_counter()
        end = self.end if self.end == math.inf else min(self.end, now + max(0.0, self.end - now) * frac)
        wl = self.work_limit
        if wl != math.inf:
            wl = min(wl, self._work[0] + math.ceil(max(0.0, wl - self._work[0]) * frac))
        return Deadline(end, self.start, wl, self._work)
