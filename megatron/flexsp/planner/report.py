"""What ``flexsp-plan`` prints: one row per method, every peer side by side, and where time goes.

Why a module apart from the CLI: the table is the answer a user reads ("is FlexSP faster than
Megatron's dynamic CP on my data and cluster, and by how much?"), so it is tested on its own,
and benchmarks can print the same table from plans they made themselves.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .costmodel import CostModel
from .explain import breakdown, explain_table
from .plan import Plan

__all__ = [
    "MethodStats",
    "plan_wall_s",
    "summarize",
    "format_table",
    "flexsp_choice_note",
    "explain_report",
    "recompute_note",
    "tensor_parallel_note",
]


@dataclass
class MethodStats:
    """One method over all planned batches: means of the estimate, its ratio to the bound, plan sizes and times."""

    method: str
    mean_ms: float
    speedup_vs_static: float | None
    mean_ratio_to_lb: float
    plan_s_median: float
    plan_s_max: float
    iters: int
    mean_micro_batches: float = float("nan")
    flexsp_speedup: float | None = None  # this method's time over flexsp's: what flexsp gains over it


def plan_wall_s(plan: Plan) -> float:
    """Wall seconds the method took for this plan (measured by the CLI; else the solver's own time)."""
    return float(plan.solver.extra.get("wall_s", plan.solver.solve_time_s))


def _mean_ms(plans: Sequence[Plan] | None) -> float | None:
    return statistics.fmean(p.estimated_time_ms for p in plans) if plans else None


def summarize(results: Mapping[str, Sequence[Plan]]) -> list[MethodStats]:
    """Per method: mean estimated ms per iteration, speedups (static over it, it over flexsp), plan statistics."""
    static_mean, flexsp_mean = _mean_ms(results.get("static")), _mean_ms(results.get("flexsp"))
    rows = []
    for m, plans in results.items():
        mean = statistics.fmean(p.estimated_time_ms for p in plans)
        ratios = [p.estimated_time_ms / p.solver.lower_bound_ms for p in plans if p.solver.lower_bound_ms]
        walls = [plan_wall_s(p) for p in plans]
        rows.append(
            MethodStats(
                m,
                mean,
                static_mean / mean if static_mean else None,
                statistics.fmean(ratios) if ratios else float("nan"),
                statistics.median(walls),
                max(walls),
                len(plans),
                statistics.fmean(p.num_micro_batches for p in plans),
                mean / flexsp_mean if flexsp_mean else None,
            )
        )
    return rows


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "n/a"


def format_table(rows: Sequence[MethodStats]) -> str:
    """The side-by-side table: ms/iteration, x lower bound, speedups, micro-batches, planning seconds."""
    head = (
        f"{'method':<20} {'est. ms/iter':>13} {'x lower bound':>14} {'vs static':>10} {'flexsp over it':>15} "
        f"{'micro-batches':>14} {'plan s (median)':>16} {'plan s (max)':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.method:<20} {r.mean_ms:>13.1f} {r.mean_ratio_to_lb:>13.3f}x {_x(r.speedup_vs_static):>10} "
            f"{_x(r.flexsp_speedup):>15} {r.mean_micro_batches:>14.1f} {r.plan_s_median:>16.3f} {r.plan_s_max:>13.3f}"
        )
    return "\n".join(lines)


def flexsp_choice_note(results: Mapping[str, Sequence[Plan]]) -> str | None:
    """Which plan the flexsp method kept per batch (the solver's, or a better baseline's; see api)."""
    plans = results.get("flexsp")
    if not plans:
        return None
    counts: dict[str, int] = {}
    for p in plans:
        c = str(p.solver.extra.get("chosen", "solver"))
        counts[c] = counts.get(c, 0) + 1
    others = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "solver")
    return f"flexsp: the solver's plan was kept in {counts.get('solver', 0)}/{len(plans)} batches" + (
        f" (a better baseline plan in the others: {others})" if others else ""
    )


def tensor_parallel_note(results: Mapping[str, Sequence[Plan]]) -> str | None:
    """At TP t > 1: that every method planned over the same units of t GPUs, and each one's largest SP group
    (in units, and GPUs), so a reader never mistakes a degree in units for one in GPUs."""
    plans = [p for ps in results.values() for p in ps]
    tps = {p.tensor_parallel_size for p in plans}
    if not plans or tps == {1}:
        return None
    t, units = max(tps), plans[0].num_units
    most = ", ".join(
        f"{m} {max(g.degree for p in ps for mb in p.micro_batches for g in mb.groups)}" for m, ps in results.items()
    )
    return f"tensor parallel: every method planned over {units} units of {t} GPUs; largest SP group in units: {most}"


def recompute_note(results: Mapping[str, Sequence[Plan]], recompute: str) -> str:
    """Per method, the share of non-empty groups that run each recompute mode (--recompute)."""
    parts = []
    for m, plans in results.items():
        count: dict[str, int] = {}
        for p in plans:
            for mb in p.micro_batches:
                for g in mb.groups:
                    if g.sequences:
                        count[g.recompute] = count.get(g.recompute, 0) + 1
        n = max(sum(count.values()), 1)
        parts.append(f"{m} " + "/".join(f"{k} {100 * v / n:.0f}%" for k, v in sorted(count.items())))
    return f"recompute {recompute}, groups per mode: " + "; ".join(parts)


def explain_report(results: Mapping[str, Sequence[Plan]], cost: CostModel) -> str:
    """``--explain``: for every batch, each method's estimate split into unavoidable time and four losses,
    then the means over the batches (explain.py says what each column is)."""
    n = min(len(v) for v in results.values())
    out = [
        "where the time goes (ms per iteration, % of the method's estimate): unavoidable = the simple lower bound "
        "(work at the cheapest degree + the micro-batches memory needs); degree (a2a) = sequences on wider groups "
        "than their cheapest; imbalance = idle ranks waiting for the micro-batch's slowest group; extra mbs = "
        "fixed per-micro-batch cost beyond memory's minimum; mem packing = idle time the lower bound proves "
        "unavoidable"
    ]
    for k in range(n):
        out += ["", f"batch {k}:", explain_table({m: plans[k] for m, plans in results.items()}, cost)]
    out += ["", f"mean over {n} batch(es):", _mean_table(results, cost, n)]
    return "\n".join(out)


def _mean_table(results: Mapping[str, Sequence[Plan]], cost: CostModel, n: int) -> str:
    head = f"{'method':<22} {'est ms':>10} {'unavoidable':>12} {'degree (a2a)':>13} {'imbalance':>11} "
    head += f"{'extra mbs':>10} {'mem packing':>12}"
    lines = [head, "-" * len(head)]
    for m, plans in results.items():
        parts = [breakdown(p, cost) for p in plans[:n]]
        cols = [
            statistics.fmean(getattr(b, f) for b in parts)
            for f in (
                "total_ms",
                "unavoidable_ms",
                "degree_ms",
                "imbalance_ms",
                "extra_micro_batches_ms",
                "memory_packing_ms",
            )
        ]
        widths = (10, 12, 13, 11, 10, 12)
        cols = [v if abs(v) >= 0.05 else 0.0 for v in cols]  # float noise of the exact split
        lines.append(f"{m:<22} " + " ".join(f"{v:>{w},.1f}" for v, w in zip(cols, widths)))
    return "\n".join(lines)
