"""What every improvement move of the global search shares: the search state and cheap bounds.

Why: the moves (``fill``, ``polish``, ``moves``, ``pairs``) are pluggable steps of one driver;
each takes a ``Search`` and the incumbent micro-batches (a list of ``Chunk``, changed in place)
and returns how many changes it accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..deadline import Deadline
from ..micro_batch import Chunk, PlannerContext
from .solve_cache import SolveCache

__all__ = ["Search", "Move", "MBBounds", "total", "replace_pair"]


def total(mbs: list[Chunk]) -> float:
    """Estimated time of the micro-batches: the sum of their solutions' times."""
    return float(sum(c.sol.time_ms for c in mbs))


@dataclass
class Search:
    """The sorted batch (``Ls``, ``taus``), its solve cache, the deadline and the target (lower bound x (1 + gap))."""

    ctx: PlannerContext
    Ls: np.ndarray
    taus: np.ndarray
    solve: SolveCache
    deadline: Deadline
    target: float

    @property
    def budget(self) -> float:
        """Tokens all ranks hold together (a micro-batch's memory bound), with a little slack."""
        return float(self.ctx.cost.tokens_per_gpu * self.ctx.world_size) + 1e-9

    def done(self, mbs: list[Chunk]) -> bool:
        """Out of time (or work), or within the gap of the lower bound."""
        return self.deadline.passed() or total(mbs) <= self.target


Move = Callable[[Search, list[Chunk]], int]


def replace_pair(mbs: list[Chunk], a: int, new_a: Chunk, b: int, new_b: Chunk) -> None:
    """Micro-batch b takes ``new_b``; a takes ``new_a``, or vanishes when its sequences moved out (b first:
    deleting a shifts the indices after it)."""
    mbs[b] = new_b
    if new_a.idx.size:
        mbs[a] = new_a
    else:
        del mbs[a]


class MBBounds:
    """Cheap per-micro-batch lower bounds (``micro_batch.mb_lower_bound``) after moving sequences in or out.

    Kept as Python floats per micro-batch: the sum of cheapest GPU-ms and the two largest
    least-taus, so a candidate move or swap is dismissed in a few operations, without a solve.
    """

    def __init__(self, ctx: PlannerContext, Ls: np.ndarray, taus: np.ndarray):
        d = np.asarray(ctx.degrees, dtype=np.float64)
        self.g = (taus * d[None, :]).min(axis=1).tolist()  # cheapest GPU-ms per position
        self.tm = taus.min(axis=1).tolist()  # least tau per position
        self.L = Ls.tolist()
        self.beta1, self.ws = ctx.beta1, ctx.world_size

    def summary(self, idx: np.ndarray) -> tuple[float, float, float, int, int]:
        """(GPU-ms, largest tau, second largest tau, position of the largest, tokens)."""
        G, t1, t2, p1, tok = 0.0, 0.0, 0.0, -1, 0
        for i in idx.tolist():
            G += self.g[i]
            tok += self.L[i]
            t = self.tm[i]
            if t > t1:
                t1, t2, p1 = t, t1, i
            elif t > t2:
                t2 = t
        return G, t1, t2, p1, tok

    def after(self, sm: tuple[float, float, float, int, int], out: int | None, into: int | None) -> float:
        """Lower bound of the micro-batch summarised by ``sm`` without ``out`` and with ``into``."""
        G, t1, t2, p1, _ = sm
        top = t2 if out is not None and out == p1 else t1
        if out is not None:
            G -= self.g[out]
        if into is not None:
            G += self.g[into]
            top = max(top, self.tm[into])
        return self.beta1 + max(top, G / self.ws)
