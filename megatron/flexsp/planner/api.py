"""The planner's front door: one call plans one global batch with any method.

Used by the trainer's planner hook (background process on rank 0), by ``flexsp-plan`` and by
the benchmarks. Every plan returned here has passed ``validate_plan`` against the cost model,
so the runtime can trust it.

``flexsp`` plans under ONE deadline (``time_limit_s`` from the call): first the plans of
Megatron's dynamic-CP and hybrid-CP rules and the best homogeneous plan (batch-adaptive) for the
same batch, strongest first (milliseconds at 64 GPUs, up to 2 s at 1024; each skipped when its
predicted cost would take more than half the time left), then the FlexSP
solver, which gets the rest of the time and starts from those plans as seeds (they use the same
candidate groups, so they lie in FlexSP's search space) and improves on them until the deadline
or until its plan is within ``gap`` of the lower bound. The best plan is returned, so FlexSP is
never estimated slower than a baseline it ran. ``solver.extra["chosen"]`` says which one was
kept: "solver" when the solver's plan is strictly better than every baseline, else the
baseline's name ("homogeneous", "megatron-hybrid-cp" or "megatron-dynamic-cp"; then ``solver_estimate_ms`` is the
solver's own estimate, equal when the solver could not improve on it).

Tensor parallelism: with a unit cost model (``tensor_parallel.unit_cost_model``) ``config.world_size`` is
the number of units and every method plans over them unchanged; the returned plan is stamped with
``tensor_parallel_size`` and the world size in GPUs (``stamp_units``, contract C6).

``config.recompute`` (``mode_choice``): a fixed mode plans every method on that mode's model and
labels every group with it; "auto" lets the solver choose per group, and a baseline rule is run
on each mode's model with each group labelled by the fastest mode that fits it.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import flexsp as _flexsp_module  # imported here: a first call's import must not eat its time limit
from .baselines import batch_adaptive_plan, static_plan
from .bounds import lower_bound_ms
from .config import FALLBACK_TIME_S, METHODS, PlannerConfig
from .costmodel import CostModel
from .deadline import Deadline
from .dynamic_cp import dynamic_cp_plan
from .hybrid_cp import hybrid_cp_plan
from .mode_choice import best_rule_plan, label_plan, planning_modes
from .plan import NoFeasiblePlanError, Plan, PlanError, validate_plan
from .tensor_parallel import unit_size

__all__ = ["METHODS", "FALLBACK_TIME_S", "PlannerConfig", "plan_global_batch", "fallback_plan", "stamp_units"]


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


# Predicted seconds of the baselines, so that a tight deadline skips a baseline instead of overrunning.
# Measured on the 2-core development machine (code-corpus batches, gpt-7b; 64 x 512 / 256 x 2048 /
# 1024 x 8192): homogeneous 0.011 / 0.054 / 1.63 s (it packs every degree over every rank), hybrid-CP
# 0.012 / 0.087 / 0.18 s, dynamic-CP 0.027 / 0.13 / 1.66 s; the forms below lie 1.2-2x above those.
def _predicted_s(name: str, n: int, world_size: int) -> float:
    if name == "megatron-hybrid-cp":
        return 1e-3 + 4e-5 * n
    if name == "megatron-dynamic-cp":
        return 2e-3 + 2.5e-7 * n * world_size
    return 1e-3 + 2.5e-5 * n + 2e-7 * n * world_size


def _memory_bound_seed(
    lengths: list[int], cost: CostModel, config: PlannerConfig, deadline: Deadline, modes: tuple[str, ...]
) -> list[tuple[str, Plan]]:
    """Auto on a batch the fastest mode cannot hold (a sequence needs recomputation): half the time plans
    with the one mode of least lower bound that holds it, labelled per group; the mixed search starts
    there. (Where the fastest mode holds the batch, the search's own cuts and solves start from it.)"""
    if len(modes) < 2 or _holds(lengths, cost.for_mode(modes[0]), config.world_size):
        return []
    lbs = [
        (lower_bound_ms(lengths, cost.for_mode(m), config.world_size), m)
        for m in modes[1:]
        if _holds(lengths, cost.for_mode(m), config.world_size)
    ]
    if not lbs:
        return []
    m = min(lbs)[1]
    p = _flexsp_module.plan_flexsp(
        lengths, cost, config.world_size, gap=config.gap, deadline=deadline.share(0.5), recompute=m
    )
    return [("flexsp-" + m, label_plan(p, cost, modes))]


def _holds(lengths: list[int], cost: CostModel, world_size: int) -> bool:
    return max(lengths) <= cost.capacity(max(cost.allowed_degrees(world_size)))


def _flexsp(
    lengths: list[int], cost: CostModel, config: PlannerConfig, lb: float, deadline: Deadline, modes: tuple[str, ...]
) -> Plan:
    baselines: list[tuple[str, Plan]] = []
    skipped = []
    # strongest first: where the deadline cannot fit them all (1024 GPUs x 8192 sequences in 4.5 s), the one
    # skipped should be the homogeneous plan, which the Megatron rules beat on every batch measured
    seeds = (
        ("megatron-dynamic-cp", dynamic_cp_plan),
        ("megatron-hybrid-cp", hybrid_cp_plan),
        ("homogeneous", batch_adaptive_plan),
    )
    for name, build in seeds:
        need = _predicted_s(name, len(lengths), config.world_size) * len(modes)
        if not deadline.deterministic and need > 0.5 * deadline.left():
            skipped.append(name)
            continue
        try:
            baselines.append((name, _rule(build, lengths, cost, config.world_size, modes, lower_bound_ms=lb)))
        except NoFeasiblePlanError:  # e.g. a length needing degree 16 on 24 ranks: no homogeneous plan
            continue
    baselines += _memory_bound_seed(lengths, cost, config, deadline, modes)
    plan = _flexsp_module.plan_flexsp(
        lengths,
        cost,
        config.world_size,
        time_limit_s=config.time_limit_s,
        gap=config.gap,
        deadline=deadline,
        seeds=baselines,
        recompute=config.recompute,
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


def _rule(build, lengths: list[int], cost: CostModel, ws: int, modes: tuple[str, ...], **kw) -> Plan:
    """A baseline rule's plan: as before without recomputation, else labelled per ``mode_choice``."""
    if modes == ("none",):
        return build(lengths, cost, ws, **kw)
    return best_rule_plan(build, lengths, cost, ws, modes, **kw)


def plan_global_batch(lengths: Sequence[int], cost: CostModel, config: PlannerConfig) -> Plan:
    """Plan one global batch with ``config.method``; the result is validated against ``cost``."""
    deadline = Deadline.after(config.time_limit_s, work_limit=config.work_limit)
    lengths = _check_lengths(lengths, config)
    ws = config.world_size
    modes = planning_modes(cost, config.recompute)
    # also raises NoFeasiblePlanError naming impossible lengths (under the leanest mode allowed)
    lb = lower_bound_ms(lengths, cost.envelope(modes), ws)
    if config.method == "flexsp":
        plan = _flexsp(lengths, cost, config, lb, deadline, modes)
    elif config.method == "static":
        kw = {"max_seq_len": config.max_seq_len, "degree": config.static_degree}
        plan = _rule(static_plan, lengths, cost, ws, modes, lower_bound_ms=lb, **kw)
    elif config.method == "batch-adaptive":
        plan = _rule(batch_adaptive_plan, lengths, cost, ws, modes, lower_bound_ms=lb)
    elif config.method == "megatron-dynamic-cp":
        plan = _rule(dynamic_cp_plan, lengths, cost, ws, modes, lower_bound_ms=lb)
    else:
        plan = _rule(hybrid_cp_plan, lengths, cost, ws, modes, lower_bound_ms=lb)
    validate_plan(plan, cost, world_size=ws, num_sequences=len(lengths))
    return stamp_units(plan, cost)


def stamp_units(plan: Plan, cost: CostModel) -> Plan:
    """A plan over the units of a unit cost model (``config.world_size`` units) says so for the runtime (C6):
    ``tensor_parallel_size`` t and ``world_size`` in GPUs; its groups keep their unit indices."""
    t = unit_size(cost)
    if t > 1 and plan.tensor_parallel_size == 1:
        plan.world_size *= t
        plan.tensor_parallel_size = t
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
        recompute=config.recompute,
    )
    validate_plan(plan, cost, world_size=config.world_size, num_sequences=len(lengths))
    return stamp_units(plan, cost)
