"""What every micro-batch solver shares: the per-batch context, a micro-batch's solution, a chunk.

Why a module of its own: the greedy, exact and MILP solvers (and the global-batch search that
calls them) all speak in these types; keeping them apart from any one solver lets each solver
module import only what it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..costmodel import CostModel
from ..placement import can_place

__all__ = ["PlannerContext", "MBSolution", "Chunk", "EXACT_MAX_WORLD", "EXACT_MAX_STRUCTURES", "EPS"]

EPS = 1e-9
EXACT_MAX_WORLD = 16  # world sizes up to this get the exact per-micro-batch solver
EXACT_MAX_STRUCTURES = 400  # ... as long as the structures are this few


@dataclass
class PlannerContext:
    """What every micro-batch solve needs, computed once per global batch."""

    cost: CostModel
    world_size: int
    degrees: list[int]
    caps: np.ndarray  # [D] tokens per group of each degree
    beta1: float
    milp_shots: tuple[float, ...] = (0.03, 0.12)  # MILP time limits tried per micro-batch
    _structures: list[tuple[int, ...]] | None = field(default=None, repr=False)
    _structures_done: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, cost: CostModel, world_size: int) -> PlannerContext:
        degs = cost.allowed_degrees(world_size)
        return cls(
            cost, world_size, degs, np.array([cost.capacity(d) for d in degs], dtype=np.float64), cost.compute.beta1_ms
        )

    def structures(self) -> list[tuple[int, ...]] | None:
        """Placeable group structures (degree indices, largest degree first), or None where too many to enumerate."""
        if not self._structures_done:
            self._structures_done = True
            if self.world_size <= EXACT_MAX_WORLD:
                self._structures = _enumerate_structures(self)
        return self._structures

    @property
    def exact(self) -> bool:
        """Whether micro-batches of this cluster are solved by the exact structure enumeration."""
        return self.structures() is not None


def _enumerate_structures(ctx: PlannerContext) -> list[tuple[int, ...]] | None:
    """All multisets of allowed degrees summing to the world size that aligned blocks can hold."""
    out: list[tuple[int, ...]] = []
    D = len(ctx.degrees)

    def rec(rest: int, kmax: int, cur: list[int]) -> bool:
        if rest == 0:
            degs = [ctx.degrees[k] for k in cur]
            if can_place(degs, ctx.cost, ctx.world_size):
                out.append(tuple(cur))
            return len(out) <= EXACT_MAX_STRUCTURES
        for k in range(kmax, -1, -1):
            if ctx.degrees[k] <= rest:
                cur.append(k)
                ok = rec(rest - ctx.degrees[k], k, cur)
                cur.pop()
                if not ok:
                    return False
        return True

    if not rec(ctx.world_size, D - 1, []):
        return None
    return out


@dataclass
class MBSolution:
    """One micro-batch: group degrees and their members (local indices into the chunk)."""

    degrees: list[int]
    members: list[list[int]]
    time_ms: float
    method: str = "greedy"
    extra: dict = field(default_factory=dict)


@dataclass
class Chunk:
    """A micro-batch of the global-batch search: positions in the sorted batch and their solution.

    Unpacks as ``idx, sol`` so that loops read ``for idx, sol in chunks``.
    """

    idx: np.ndarray
    sol: MBSolution

    def __iter__(self) -> Iterator:
        return iter((self.idx, self.sol))
