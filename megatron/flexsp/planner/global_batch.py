"""FlexSP planning of one global batch: micro-batches, then groups per micro-batch, then ranks.

Why it is anytime: the planner runs beside training on the same CPUs, so it must hand over a
good plan when its time is up, not a perfect one later. One ``Deadline`` bounds every phase;
each phase only ever replaces the incumbent with something better, and the search stops early
when the incumbent is within ``gap`` of the lower bound (``bounds.lower_bound_ms``). The budget
is wall-clock time, or a number of micro-batch solves where plans must be reproducible
(``deadline.Deadline``).

1. Constructive (``search.cuts``; milliseconds, at most 40 % of the budget, but always one
   complete plan): consecutive cuts of the batch sorted longest first, and the ``seeds`` (the
   api passes the baselines' plans), each scored by solving its micro-batches quickly.
2. Improvement (``search.driver``), until the deadline or the gap: the best cut and its
   runners-up re-solved in full, then the phase table (``search.phases``: fill, polish, moves,
   pairs, moves again), then an exact re-solve on small clusters or MILP shots under a clock
   budget, then the other cuts, re-solved and filled. All solves go through one cache
   (``search.solve_cache``).
3. Degrees become ranks with ``placement.place_groups``; the plan is validated before it is
   returned.

Never fails when a plan exists: if no cut can be solved, the last resort is one sequence per
group at its smallest degree, groups packed first-fit into micro-batches, which is always
valid (left-over ranks are degree-1 groups, so there are more groups than sequences).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .bounds import check_feasible, lower_bound_ms
from .config import PlannerConfig
from .costmodel import CostModel
from .deadline import Deadline
from .micro_batch import MBSolution, PlannerContext
from .mode_choice import planning_modes
from .placement import place_groups
from .plan import Group, MicroBatch, Plan, PlanError, SolverInfo, estimate_plan_ms, validate_plan
from .search.cuts import safe_plan as _safe_plan
from .search.driver import plan_chunks

__all__ = ["plan_flexsp", "greedy_plan", "DEFAULT_GAP"]

DEFAULT_GAP = PlannerConfig.gap  # kept for importers; the default lives in PlannerConfig


def _to_plan(ctx: PlannerContext, lengths: np.ndarray, chunks: list[tuple[np.ndarray, MBSolution]]) -> Plan:
    """Micro-batches of batch positions -> a Plan with ranks placed and each group's recompute mode."""
    mbs = []
    for idx, sol in chunks:
        ranks = place_groups(sol.degrees, ctx.cost, ctx.world_size)
        opts = sol.options if sol.options is not None else [None] * len(sol.degrees)
        groups = []
        for r, mem, k in zip(ranks, sol.members, opts):
            seqs = [int(idx[j]) for j in mem]
            groups.append(Group(list(r), seqs, ctx.group_mode([int(lengths[s]) for s in seqs], len(r), k)))
        groups.sort(key=lambda g: g.ranks[0])
        mbs.append(MicroBatch(groups))
    return Plan(ctx.world_size, [int(x) for x in lengths], mbs)


def _checked_lengths(lengths: Sequence[int], cost: CostModel, world_size: int) -> np.ndarray:
    L = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if L.size == 0:
        raise PlanError("cannot plan an empty global batch (no sequences)")
    if (L <= 0).any():
        bad = np.flatnonzero(L <= 0)[:8].tolist()
        raise PlanError(f"lengths must be positive; sequences {bad} are not")
    check_feasible(L, cost, world_size)
    return L


def _valid_plan(ctx: PlannerContext, L: np.ndarray, chunks: list, info: dict) -> Plan:
    """The search's plan, or the last resort where it does not validate."""
    plan = _to_plan(ctx, L, chunks)
    try:
        validate_plan(plan, ctx.base)
    except PlanError:
        if info.get("cut") == "safe":
            raise
        order = np.argsort(-L, kind="stable")
        taus = ctx.tau_table(L[order])
        safe = _safe_plan(ctx, L[order], taus)
        plan = _to_plan(ctx, L, [(order[idx], sol) for idx, sol in safe])
        validate_plan(plan, ctx.base)
        info["cut"] = "safe"
    return plan


def _status(ctx: PlannerContext, chunks: list, info: dict, use_milp: bool, deadline: Deadline) -> str:
    """How the search ended: gap, proven micro-batches, heuristic, time limit or MILP optimal."""
    statuses = [st for _, sol in chunks for st in sol.extra.get("milp_statuses", [])]
    proven = [bool(sol.extra.get("exact_proven")) for _, sol in chunks]
    if statuses:
        info["milp_statuses"] = statuses
    if info.get("gap_reached"):
        return "gap"
    if ctx.exact and proven and all(proven):
        return "exact_micro_batches"
    if not use_milp:
        return "heuristic"
    if any(s == "time_limit" for s in statuses) or deadline.passed():
        return "time_limit"
    if statuses:
        return "optimal" if all(s == "optimal" for s in statuses) else "heuristic"
    return "heuristic"


@dataclass(frozen=True)
class _Budget:
    """What the caller grants the search: a time limit (or a deadline, or a work budget) and a gap."""

    time_limit_s: float
    gap: float
    deadline: Deadline | None
    work_limit: int | None


def _run(
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    budget: _Budget,
    *,
    use_milp: bool,
    method: str,
    seeds: Sequence[tuple[str, Plan]] = (),
    recompute: str = "none",
) -> Plan:
    time_limit_s, gap, deadline = budget.time_limit_s, budget.gap, budget.deadline
    if deadline is None:
        deadline = Deadline.after(time_limit_s, work_limit=budget.work_limit)
    modes = planning_modes(cost, recompute)
    plan_cost = cost.envelope(modes)  # bounds and memory budgets that hold for any mix of the modes
    L = _checked_lengths(lengths, plan_cost, world_size)
    lb = lower_bound_ms(L, plan_cost, world_size)
    ctx = PlannerContext.build(cost, world_size, modes)
    ctx.milp_shots = (max(0.015 * time_limit_s, 0.01), max(0.06 * time_limit_s, 0.02))
    chunks, info = plan_chunks(ctx, L, use_milp=use_milp, deadline=deadline, lb=lb, gap=gap, seeds=seeds)
    plan = _valid_plan(ctx, L, chunks, info)
    plan.estimated_time_ms = estimate_plan_ms(plan, cost)  # each group under its own mode
    status = _status(ctx, chunks, info, use_milp, deadline)
    info.update(num_micro_batches=plan.num_micro_batches, gap=gap)
    if recompute != "none":
        info["recompute"] = recompute
    plan.solver = SolverInfo(
        method=method, status=status, solve_time_s=deadline.elapsed(), lower_bound_ms=lb, extra=info
    )
    return plan


def greedy_plan(
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    *,
    time_limit_s: float = PlannerConfig.time_limit_s,
    gap: float = PlannerConfig.gap,
    deadline: Deadline | None = None,
    work_limit: int | None = None,
    recompute: str = "none",
) -> Plan:
    """Heuristic plan (no MILP) within ``time_limit_s`` (or ``work_limit`` solves); always valid when any plan exists.
    ``recompute``: as ``PlannerConfig.recompute``."""
    budget = _Budget(time_limit_s, gap, deadline, work_limit)
    return _run(lengths, cost, world_size, budget, use_milp=False, method="flexsp-greedy", recompute=recompute)


def plan_flexsp(
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    *,
    seeds: Sequence[tuple[str, Plan]] = (),
    time_limit_s: float = PlannerConfig.time_limit_s,
    gap: float = PlannerConfig.gap,
    deadline: Deadline | None = None,
    work_limit: int | None = None,
    recompute: str = "none",
) -> Plan:
    """FlexSP plan within ``time_limit_s`` (or ``deadline``): constructive, then improved until the deadline or ``gap``.

    ``seeds``: (name, plan) pairs that compete with the constructive cuts (the api passes the
    baselines). ``work_limit``: a budget of micro-batch solves instead of the clock (the same
    batch then always gets the same plan; no MILP, whose time limits are clock-bound). The
    search has no randomness: what it reaches depends only on the budget it gets. ``recompute``: a mode
    for every group, or "auto" (``PlannerConfig.recompute``); seeds must use the modes it allows.
    """
    budget = _Budget(time_limit_s, gap, deadline, work_limit)
    return _run(lengths, cost, world_size, budget, use_milp=True, method="flexsp", seeds=seeds, recompute=recompute)
