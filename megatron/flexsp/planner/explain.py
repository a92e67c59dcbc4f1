"""Where a plan's time goes: an exact split of its estimate into what no plan avoids and four losses.

Why: a user deciding whether FlexSP pays off on their cluster needs to see *why* one schedule
beats another, not just a ratio: at 64 GPUs the peers lose time to all-to-all in groups wider
than needed and to idle ranks; at 4 ranks there is little of either to win back. The split is
exact, so the rows add up to the cost model's estimate (DESIGN.md formulas).

Weighting each micro-batch's duration C by the ranks, ``C = sum_g d_g C / N`` (N ranks), and a
group of degree d busy for ``T_g = beta1 + sum_s tau(s, d)`` (tau: work / d + all-to-all), gives

    estimate = sum_s d_s tau(s, d_s) / N + beta1 * sum_mb sum_(non-empty g) d_g / N
               + sum_mb sum_g d_g (C_mb - T_g) / N

and each term splits against the lower bound's parts (``bounds``):

* work at the cheapest degree, ``sum_s min_d d tau(s, d) / N``, plus ``beta1 * M_min`` (the
  micro-batches memory needs): what no valid plan avoids (the simple lower bound LB1);
* **degree too high**: the extra GPU-ms of sequences on a wider group than their cheapest
  (all-to-all, and cross-node bandwidth), over N;
* **extra micro-batches**: the fixed per-micro-batch cost beyond ``beta1 * M_min``;
* **memory-limited packing**: idle rank-time that the lower bound already proves unavoidable
  (its part above LB1: the longest sequences' micro-batch, which memory keeps others from sharing);
* **imbalance**: the rest of the idle rank-time (groups finishing before the micro-batch's slowest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .bounds import cheapest_gpu_ms, lower_bound_ms, min_micro_batches
from .costmodel import CostModel
from .plan import Plan, micro_batch_ms

__all__ = ["Breakdown", "breakdown", "explain_table"]


@dataclass(frozen=True)
class Breakdown:
    """A plan's estimate (ms per iteration) as unavoidable time plus four losses; the fields add up to total_ms."""

    total_ms: float
    unavoidable_ms: float
    degree_ms: float
    extra_micro_batches_ms: float
    memory_packing_ms: float
    imbalance_ms: float


def _gpu_ms(length: int, degree: int, cost: CostModel, mode: str = "none") -> float:
    """GPU-ms of one sequence in a group of this degree (and recompute mode), beta1 excluded."""
    work = cost.compute_ms([length], degree, mode) - cost.compute.beta1_ms
    return degree * (work + cost.alltoall_ms(length, degree, mode))


def breakdown(plan: Plan, cost: CostModel) -> Breakdown:
    """The exact split of ``plan``'s cost-model estimate (see the module docstring). With recompute modes, the
    unavoidable part is that of the modes' envelope (the plan's modes at their cheapest, ``RecomputeModes``),
    so a mode's extra compute counts with the degree loss."""
    n, lengths, beta1 = plan.num_units, plan.lengths, cost.compute.beta1_ms
    env = cost.envelope(sorted({g.recompute for mb in plan.micro_batches for g in mb.groups}))
    used = fixed = idle = 0.0
    for mb in plan.micro_batches:
        slowest = micro_batch_ms(mb, lengths, cost)
        for g in mb.groups:
            seqs = [lengths[i] for i in g.sequences]
            busy = cost.group_time_ms(seqs, g.degree, g.recompute) if seqs else 0.0
            idle += g.degree * (slowest - busy)
            fixed += g.degree * beta1 if seqs else 0.0
            used += sum(_gpu_ms(s, g.degree, cost, g.recompute) for s in seqs)
    cheapest = float(cheapest_gpu_ms(lengths, env, n).sum())  # every sequence is in exactly one group
    floor_fixed = beta1 * min_micro_batches(lengths, env, n)
    lb1 = cheapest / n + floor_fixed
    forced = max(0.0, min(idle / n, lower_bound_ms(lengths, env, n) - lb1))
    return Breakdown(
        total_ms=used / n + fixed / n + idle / n,
        unavoidable_ms=lb1,
        degree_ms=(used - cheapest) / n,
        extra_micro_batches_ms=fixed / n - floor_fixed,
        memory_packing_ms=forced,
        imbalance_ms=idle / n - forced,
    )


def explain_table(plans: Mapping[str, Plan], cost: CostModel) -> str:
    """One row per method: its estimate and where it goes, in ms per iteration and % of the estimate."""
    head = (
        f"{'method':<22} {'est ms':>10} {'unavoidable':>12} {'degree (a2a)':>13} {'imbalance':>11} "
        f"{'extra mbs':>10} {'mem packing':>12}"
    )
    out = [head, "-" * len(head)]
    for name, plan in plans.items():
        b = breakdown(plan, cost)

        def cell(x: float, w: int, total: float = b.total_ms) -> str:
            x = x if abs(x) >= 0.05 else 0.0  # float noise of the exact split, not a loss
            pct = 100.0 * x / total if total > 0 else 0.0
            return f"{x:,.1f} ({pct:.0f}%)".rjust(w)

        out.append(
            f"{name:<22} {b.total_ms:>10,.1f} {cell(b.unavoidable_ms, 12)} {cell(b.degree_ms, 13)} "
            f"{cell(b.imbalance_ms, 11)} {cell(b.extra_micro_batches_ms, 10)} {cell(b.memory_packing_ms, 12)}"
        )
    return "\n".join(out)
