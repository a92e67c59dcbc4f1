"""The planner's front door: one call plans one global batch with any method.

Used by the trainer's planner hook (background process on rank 0), by ``flexsp-plan`` and by
the benchmarks. Every plan returned here has passed ``validate_plan`` against the cost model,
so the runtime can trust it.

``flexsp`` plans under ONE deadline (``time_limit_s`` from the call): first the best
homogeneous plan (batch-adaptive) and the hybrid-CP rule's plan of the same batch (milliseconds;
each skipped when its predicted cost would take more than half the time left), then the FlexSP
solver, which gets the rest of the time and starts from those plans as seeds (they use the same
candidate groups, so they lie in FlexSP's search space) and improves on them until the deadline
or until its plan is within ``gap`` of the lower bound. The best plan is returned, so FlexSP is
never estimated slower than a baseline it ran. ``solver.extra["chosen"]`` says which one was
kept: "solver" when the solver's plan is strictly better than every baseline, else the
baseline's name ("homogeneous" or "megatron-hybrid-cp"; then ``solver_estimate_ms`` is the
solver's own estimate, equal when the solver could not improve on it).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from . import flexsp as _flexsp_module  # imported here: a first call's import must not eat its time limit
from .baselines import batch_adaptive_plan, static_plan
from .bounds import lower_bound_ms
from .costmodel import CostModel
from .deadline import Deadline
from .hybrid_cp import hybrid_cp_plan
from .plan import NoFeasiblePlanError, Plan, PlanError, validate_plan

__all__ = ["METHODS", "FALLBACK_TIME_S", "PlannerConfig", "plan_global_batch", "fallback_plan"]

METHODS = ("flexsp", "static", "batch-adaptive", "megatron-hybrid-cp")
FALLBACK_TIME_S = 0.05  # fallback_plan's budget for flexsp


@dataclass
class PlannerConfig:
    """How to plan: ``static_degree`` forces the static degree (the trainer's --context-parallel-size);
    ``max_seq_len`` is the longest length the run is configured for (static sizes its degree for it);
    ``time_limit_s`` bounds the whole flexsp solve; ``gap``: stop improving once the plan is within
    this fraction of the lower bound; ``work_limit``: instead of the clock, a budget of micro-batch
    solves, so that the same batch always gets the same plan (resumed runs, any machine)."""

    world_size: int
    method: str = "flexsp"
    time_limit_s: float = 2.0
    max_seq_len: int | None = None
    static_degree: int | None = None
    seed: int = 0
    gap: float = 0.01
    work_limit: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"planner method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("world_size", "max_seq_len", "static_degree"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"planner {name} must be an integer, got {v!r}")
            if v is not None:
                setattr(self, name, int(v))
        if self.world_size < 1:
            raise ValueError(f"planner world_size must be a positive integer, got {self.world_size!r}")
        if not self.time_limit_s > 0:
            raise ValueError(f"planner time_limit_s must be > 0, got {self.time_limit_s!r}")
        if self.work_limit is not None and (
            isinstance(self.work_limit, bool)
            or not isinstance(self.work_limit, numbers.Integral)
            or self.work_limit < 1
        ):
            raise ValueError(f"planner work_limit must be a positive integer, got {self.work_limit!r}")
        if isinstance(self.gap, bool) or not isinstance(self.gap, numbers.Real) or not 0 <= self.gap < 1:
            raise ValueError(f"planner gap must be a number in [0, 1), got {self.gap!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"planner max_seq_len must be >= 1, got {self.max_seq_len!r}")
        if self.static_degree is not None and self.static_degree < 1:
            raise ValueError(f"planner static_degree must be >= 1, got {self.static_degree!r}")


def _check_lengths(lengths: Sequence[int], config: PlannerConfig) -> list[int]:
    out = [int(x) for x in lengths]
    if not out:
        raise PlanError("cannot plan an empty global batch")
    for i, (L, raw) in enumerate(zip(out, lengths)):
        if L != raw or L < 1:
            raise PlanError(f"lengths[{i}] = {raw!r}: lengths must be integers >= 1")
    if config.max_seq_len is not None:
        over = [i for i, L in enumerate(out) if L > config.max_seq_len]
        if over:
            raise PlanError(
                f"{len(over)} sequence(s) longer than max_seq_len {config.max_seq_len}: first is "
                f"lengths[{over[0]}] = {out[over[0]]} (truncate or drop them before planning)"
            )
    return out


# Predicted seconds of the baselines (measured on the 2-core development machine, x2 slack), so
# that a tight deadline skips a baseline instead of overrunning: hybrid-CP scans groups per
# sequence, the homogeneous packer sorts and packs per degree.
def _predicted_s(name: str, n: int, world_size: int) -> float:
    if name == "megatron-hybrid-cp":
        return 1e-3 + 1.6e-7 * n * world_size
    return 1e-3 + 2e-5 * n


def _flexsp(lengths: list[int], cost: CostModel, config: PlannerConfig, lb: float, deadline: Deadline) -> Plan:
    baselines: list[tuple[str, Plan]] = []
    skipped = []
    for name, build in (("homogeneous", batch_adaptive_plan), ("megatron-hybrid-cp", hybrid_cp_plan)):
        if not deadline.deterministic and _predicted_s(name, len(lengths), config.world_size) > 0.5 * deadline.left():
            skipped.append(name)
            continue
        try:
            baselines.append((name, build(lengths, cost, config.world_size, lower_bound_ms=lb)))
        except NoFeasiblePlanError:  # e.g. a length needing degree 16 on 24 ranks: no homogeneous plan
            continue
    plan = _flexsp_module.plan_flexsp(
        lengths,
        cost,
        config.world_size,
        time_limit_s=config.time_limit_s,
        seed=config.seed,
        gap=config.gap,
        deadline=deadline,
        seeds=baselines,
    )
    solver = plan.solver
    chosen, solver_ms = "solver", plan.estimated_time_ms
    for name, other in baselines:
        if other.estimated_time_ms <= plan.estimated_time_ms * (1 + 1e-12):
            plan, chosen = other, name
    plan.solver = solver
    solver.extra = {**solver.extra, "chosen": chosen}
    if skipped:
        solver.extra["baselines_skipped"] = skipped
    if chosen != "solver":
        solver.extra["solver_estimate_ms"] = solver_ms
    solver.solve_time_s = deadline.elapsed()
    if solver.lower_bound_ms is None:
        solver.lower_bound_ms = lb
    return plan


def plan_global_batch(lengths: Sequence[int], cost: CostModel, config: PlannerConfig) -> Plan:
    """Plan one global batch with ``config.method``; the result is validated against ``cost``."""
    deadline = Deadline.after(config.time_limit_s, work_limit=config.work_limit)
    lengths = _check_lengths(lengths, config)
    ws = config.world_size
    lb = lower_bound_ms(lengths, cost, ws)  # also raises NoFeasiblePlanError naming impossible lengths
    if config.method == "flexsp":
        plan = _flexsp(lengths, cost, config, lb, deadline)
    elif config.method == "static":
        plan = static_plan(
            lengths, cost, ws, max_seq_len=config.max_seq_len, degree=config.static_degree, lower_bound_ms=lb
        )
    elif config.method == "batch-adaptive":
        plan = batch_adaptive_plan(lengths, cost, ws, lower_bound_ms=lb)
    else:
        plan = hybrid_cp_plan(lengths, cost, ws, lower_bound_ms=lb)
    validate_plan(plan, cost, world_size=ws, num_sequences=len(lengths))
    return plan


def fallback_plan(lengths: Sequence[int], cost: CostModel, config: PlannerConfig) -> Plan:
    """A fast plan that is always valid when any plan exists (greedy for flexsp, else the baseline itself).

    For flexsp: the greedy planner with ``FALLBACK_TIME_S`` (or the config's limit if smaller),
    i.e. essentially its constructive plan: the trainer needs it *now*, when the background
    planner is late.
    """
    if config.method != "flexsp":
        return plan_global_batch(lengths, cost, config)
    lengths = _check_lengths(lengths, config)
    # with a work budget (reproducible plans) the fallback is the constructive plan alone, also reproducible
    plan = _flexsp_module.greedy_plan(
        lengths,
        cost,
        config.world_size,
        time_limit_s=min(FALLBACK_TIME_S, config.time_limit_s),
        gap=config.gap,
        work_limit=1 if config.work_limit is not None else None,
    )
    validate_plan(plan, cost, world_size=config.world_size, num_sequences=len(lengths))
    return plan
