"""Which recompute modes a plan may use, and a plan's groups labelled with theirs.

Why a module of its own: the FlexSP search (``global_batch``), the api's baselines and the
benchmarks all turn the user's choice ("none", "selective", "full", "auto") into the set of
modes a group may run, and a rule-based plan (the baselines know nothing of recomputation) into
one whose groups say which mode they run. A fixed mode is one mode for every group; "auto" is
every mode the cost model has, minus those another mode dominates (no faster and no leaner):
per group, the fastest mode whose memory fits is then chosen by the solvers, which see each
(degree, mode) as an option with its own capacity and time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .costmodel import CostModel, CostModelError
from .plan import NoFeasiblePlanError, Plan, estimate_plan_ms
from .recompute import check_choice

__all__ = ["planning_modes", "label_plan", "best_rule_plan"]


def _dominated(cost: CostModel, m: str, other: str) -> bool:
    """``other`` is no slower (both factors) and needs no more memory than ``m``, and differs from it."""
    a, b = cost.for_mode(m), cost.for_mode(other)
    keys = (
        (b.compute.alpha1_ms_per_token2, a.compute.alpha1_ms_per_token2),
        (b.compute.alpha2_ms_per_token, a.compute.alpha2_ms_per_token),
        (b.alltoall.bytes_per_token, a.alltoall.bytes_per_token),
        (b.memory.activation_mb_per_token, a.memory.activation_mb_per_token),
    )
    return all(x <= y for x, y in keys) and any(x < y for x, y in keys)


def planning_modes(cost: CostModel, recompute: str) -> tuple[str, ...]:
    """The modes groups may use for the choice ``recompute`` (see module docstring).

    A fixed mode the cost model has no coefficients for is an error naming the missing field;
    "auto" on a model without a ``recompute`` key plans as "none" (there is nothing to choose).
    """
    check_choice(recompute)
    if recompute != "auto":
        if recompute not in cost.modes:
            raise CostModelError(
                f"recompute '{recompute}' needs the cost model's 'recompute.{recompute}' coefficients "
                f"(cost model '{cost.name}' has: {', '.join(cost.modes)})"
            )
        return (recompute,)
    return tuple(m for m in cost.modes if not any(_dominated(cost, m, o) for o in cost.modes))


def label_plan(plan: Plan, cost: CostModel, modes: Sequence[str]) -> Plan:
    """``plan`` (in place) with each group's mode: the only mode, or the fastest of ``modes`` whose memory
    fits the group (a group no mode fits keeps the leanest, and validation names it); re-estimated."""
    lengths = plan.lengths
    lean = min(modes, key=lambda m: cost.for_mode(m).memory.activation_mb_per_token)
    for mb in plan.micro_batches:
        for g in mb.groups:
            if len(modes) == 1:
                g.recompute = modes[0]
            else:
                g.recompute = cost.best_mode([lengths[s] for s in g.sequences], g.degree, modes) or lean
    plan.estimated_time_ms = estimate_plan_ms(plan, cost)
    return plan


def best_rule_plan(
    rule: Callable[..., Plan], lengths: Sequence[int], cost: CostModel, world_size: int, modes: Sequence[str], **kw
) -> Plan:
    """A rule's plan (a baseline) under recomputation: the rule run on each mode's model, its groups
    labelled (``label_plan``); the fastest. Raises NoFeasiblePlanError when no mode gives a plan."""
    best: Plan | None = None
    err: NoFeasiblePlanError | None = None
    for m in modes:
        try:
            p = label_plan(rule(lengths, cost.for_mode(m), world_size, **kw), cost, modes)
        except NoFeasiblePlanError as e:
            err = e
            continue
        if best is None or p.estimated_time_ms < best.estimated_time_ms - 1e-9:
            best = p
    if best is None:
        assert err is not None
        raise err
    return best
