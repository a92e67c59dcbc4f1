"""What every micro-batch solver shares: the per-batch context, a micro-batch's solution, a chunk.

Why a module of its own: the greedy, exact and MILP solvers (and the global-batch search that
calls them) all speak in these types; keeping them apart from any one solver lets each solver
module import only what it needs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..bounds import seq_tau_table
from ..costmodel import CostModel
from ..placement import can_place

__all__ = ["PlannerContext", "MBSolution", "Chunk", "EXACT_MAX_WORLD", "EXACT_MAX_STRUCTURES", "EPS"]

EPS = 1e-9
EXACT_MAX_WORLD = 16  # world sizes up to this get the exact per-micro-batch solver
EXACT_MAX_STRUCTURES = 400  # ... as long as the structures are this few


@dataclass
class PlannerContext:
    """What every micro-batch solve needs, computed once per global batch.

    The solvers choose among *options*, column k of the tau table: a group of degree ``degrees[k]``
    under recompute mode ``option_modes[k]`` (capacity ``caps[k]``). With one mode (the default,
    "none") the options are the allowed degrees, as before; with several ("auto") every allowed
    degree comes once per mode, so a group's memory-time trade is part of the choice of its degree.
    ``cost`` is the planning model (the modes' envelope: bounds and memory budgets), ``base`` the
    model with every mode's coefficients (tau columns, plan estimate and validation).
    """

    cost: CostModel
    world_size: int
    degrees: list[int]
    caps: np.ndarray  # [D] tokens per group of each option
    beta1: float
    milp_shots: tuple[float, ...] = (0.03, 0.12)  # MILP time limits tried per micro-batch
    option_modes: list[str] = field(default_factory=list)  # [D] recompute mode per option ([]: all "none")
    base: CostModel | None = None  # None: ``cost``
    _structures: list[tuple[int, ...]] | None = field(default=None, repr=False)
    _structures_done: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, cost: CostModel, world_size: int, modes: Sequence[str] = ("none",)) -> PlannerContext:
        plan_cost = cost.envelope(modes)
        degs = plan_cost.allowed_degrees(world_size)
        opts = [(d, m) for d in degs for m in modes]
        return cls(
            plan_cost,
            world_size,
            [d for d, _ in opts],
            np.array([cost.capacity(d, m) for d, m in opts], dtype=np.float64),
            plan_cost.compute.beta1_ms,
            option_modes=[m for _, m in opts],
            base=cost,
        )

    @functools.cached_property
    def modes(self) -> tuple[str, ...]:
        """The recompute modes the options use (in option order)."""
        return tuple(dict.fromkeys(self.option_modes)) or ("none",)

    def tau_table(self, L: np.ndarray) -> np.ndarray:
        """tau[i, k]: ms sequence i adds to a group of option k (inf: does not fit); one mode: ``seq_tau_table``."""
        if len(self.modes) == 1:
            return seq_tau_table(L, self.cost, self.degrees)
        base = self.base or self.cost
        out = np.empty((np.asarray(L).size, len(self.degrees)), dtype=np.float64)
        for m in self.modes:
            ks = [k for k, mk in enumerate(self.option_modes) if mk == m]
            out[:, ks] = seq_tau_table(L, base.for_mode(m), [self.degrees[k] for k in ks])
        return out

    def option_of(self, degree: int, mode: str = "none") -> int | None:
        """Column of the option (degree, mode); None if the search has no such option."""
        modes = self.option_modes or ["none"] * len(self.degrees)
        for k, d in enumerate(self.degrees):
            if d == degree and modes[k] == mode:
                return k
        return None

    def options_of(self, sol: MBSolution) -> list[int]:
        """The option column of each group of ``sol`` (recorded by the solvers, else by degree)."""
        if sol.options is not None:
            return list(sol.options)
        return [self.option_of(d, self.modes[0]) for d in sol.degrees]  # type: ignore[misc]

    def group_mode(self, lengths: Sequence[int], degree: int, option: int | None) -> str:
        """The mode a group runs: the only mode, or (several) the fastest whose memory fits its tokens, which
        is never slower than its option's mode."""
        if len(self.modes) == 1:
            return self.modes[0]
        best = (self.base or self.cost).best_mode(lengths, degree, self.modes)
        if best is None and option is not None:
            return self.option_modes[option]
        return best or self.modes[-1]

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
    """One micro-batch: group degrees, their members (local indices into the chunk) and option columns."""

    degrees: list[int]
    members: list[list[int]]
    time_ms: float
    method: str = "greedy"
    extra: dict = field(default_factory=dict)
    options: list[int] | None = None  # option column per group (PlannerContext); None: by degree


@dataclass
class Chunk:
    """A micro-batch of the global-batch search: positions in the sorted batch and their solution.

    Unpacks as ``idx, sol`` so that loops read ``for idx, sol in chunks``.
    """

    idx: np.ndarray
    sol: MBSolution

    def __iter__(self) -> Iterator:
        return iter((self.idx, self.sol))
