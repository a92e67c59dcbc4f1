"""One clock for a whole solve: every phase of the planner asks the same ``Deadline``.

Why: a planner that runs beside training steals CPU from it, so its time limit must bound the
whole solve (constructive plan, improvement phases, the baseline comparison in ``api``), not
just the MILP. Phases take a share of what is left (``share``), so an early phase cannot starve
the later ones, and loops poll ``passed()`` between units of work that take at most a few
milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Deadline"]


@dataclass(frozen=True)
class Deadline:
    """An absolute ``time.perf_counter()`` instant; ``start`` is when the solve began."""

    end: float
    start: float

    @classmethod
    def after(cls, seconds: float, start: float | None = None) -> Deadline:
        t0 = time.perf_counter() if start is None else start
        return cls(t0 + max(0.0, float(seconds)), t0)

    def left(self) -> float:
        return self.end - time.perf_counter()

    def passed(self) -> bool:
        return time.perf_counter() >= self.end

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def share(self, frac: float) -> Deadline:
        """An earlier deadline: ``frac`` of the time left from now (never later than this one)."""
        now = time.perf_counter()
        return Deadline(min(self.end, now + max(0.0, self.end - now) * frac), self.start)
