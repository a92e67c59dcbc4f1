"""The MILP micro-batch solver (any world size): bucketed lengths, short time-limited shots.

Why buckets and shots: the aggregate model (``planner.milp``) counts sequences per length
bucket and degree class, which HiGHS solves in milliseconds where a per-sequence model would
not; its counts become sequences by the greedy's dealing and local search (``groups.finish``),
and the result is kept only when it beats the incumbent. The MILP's time limit is clock-bound,
so a work-budgeted (reproducible) search never runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..bucketing import Bucketing, bucketize
from ..deadline import Deadline
from ..milp import ClassProblem, solve_class_milp
from .context import MBSolution, PlannerContext
from .greedy import fill_left_over, small_k
from .groups import finish

__all__ = ["milp_micro_batch", "milp_shots", "rebalance_iters_for", "MILP_TIME_LIMIT_S"]

MILP_TIME_LIMIT_S = 0.5  # one MILP solve, when the caller names no limit
BUCKET_ERROR = 0.02  # relative length error a bucket may hide
MAX_BUCKETS = 14
MILP_SPAN = 2  # degrees a bucket may use above its smallest feasible one (and the largest)


def rebalance_iters_for(n: int) -> int:
    """Local-search steps for a micro-batch of ``n`` sequences (grows with it, capped)."""
    return min(2 * n + 20, 400)


def _bucket_tables(
    bk: Bucketing, L: np.ndarray, tau: np.ndarray, D: int, milp_span: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per bucket: mean and max tau per degree, mean and min length (tau inf where the span excludes a degree)."""
    B = bk.num_buckets
    tmean = np.zeros((B, D))
    tmax = np.zeros((B, D))
    lmean = np.zeros(B)
    lmin = np.zeros(B)
    for b in range(B):
        mem = bk.members(b)
        tmean[b] = tau[mem].mean(axis=0)
        tmax[b] = tau[mem].max(axis=0)
        lmean[b] = L[mem].mean()
        lmin[b] = L[mem].min()
    if milp_span is not None:
        # smaller model: a bucket may use its smallest feasible degree, the next ``milp_span``
        # ones, and the largest (this makes the MILP a restriction; milp_span=None keeps all)
        fin = np.isfinite(tmax)
        kmin = np.argmax(fin, axis=1)
        ks = np.arange(D)[None, :]
        keep = (ks <= kmin[:, None] + milp_span) | (ks == D - 1)
        tmax = np.where(keep, tmax, np.inf)
        tmean = np.where(keep, tmean, np.inf)
    return tmean, tmax, lmean, lmin


def _classes(bk: Bucketing, L: np.ndarray, y: np.ndarray, D: int) -> np.ndarray:
    """Bucket counts -> concrete sequences: the longest members of a bucket go to its largest class."""
    cls = np.zeros(L.size, dtype=np.int64)
    for b in range(bk.num_buckets):
        mem = bk.members(b)
        mem = mem[np.argsort(-L[mem], kind="stable")]
        pos = 0
        for k in range(D - 1, -1, -1):
            c = int(y[b, k])
            cls[mem[pos : pos + c]] = k
            pos += c
    return cls


def milp_micro_batch(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    best: MBSolution | None,
    iters: int,
    *,
    time_limit_s: float = MILP_TIME_LIMIT_S,
    bucket_error: float = BUCKET_ERROR,
    max_buckets: int | None = MAX_BUCKETS,
    milp_span: int | None = MILP_SPAN,
    deadline: Deadline | None = None,
) -> MBSolution | None:
    """One MILP solve on buckets, concretised; the better of it and ``best`` (which records the MILP's status)."""
    bk = bucketize(L, max_error=bucket_error, breaks=[int(c) for c in ctx.caps], max_buckets=max_buckets, max_atoms=400)
    D = len(ctx.degrees)
    nm = len(ctx.modes)  # options per degree: the span counts degrees, so it covers every mode of each
    span = None if milp_span is None else milp_span * nm + nm - 1
    tmean, tmax, lmean, lmin = _bucket_tables(bk, L, tau, D, span)
    prob = ClassProblem(bk.counts, tmean, tmax, lmean, ctx.degrees, ctx.caps, ctx.world_size, lmin)
    up = best.time_ms - ctx.beta1 if best is not None else None
    sol = solve_class_milp(prob, upper=up, time_limit_s=time_limit_s)
    info = {"milp_status": sol.status, "milp_time_s": sol.solve_time_s, "buckets": bk.num_buckets}
    if not np.isfinite(sol.cprime):
        if best is not None:
            best.extra.update(info)
        return best
    cls = _classes(bk, L, sol.y, D)
    load = np.array([(np.where(sol.y[:, k] > 0, tmean[:, k], 0.0) * sol.y[:, k]).sum() for k in range(D)])
    cnt = sol.y.sum(axis=0)
    gk = fill_left_over(ctx, sol.n.astype(np.int64), load, cnt, small_k(L, tau))
    cand = finish(ctx, L, tau, gk, cls, "milp", iters, deadline)
    if cand is not None:
        cand.extra.update(info)
        cand.extra["milp_bound_ms"] = sol.cprime + ctx.beta1
    if cand is not None and (best is None or cand.time_ms < best.time_ms - 1e-9):
        return cand
    if best is not None:
        best.extra.update(info)
    return best


def milp_shots(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    sol: MBSolution,
    deadline: Deadline,
    shots: Sequence[float] | None = None,
) -> MBSolution:
    """Improve a micro-batch with short MILP solves (the MILP's incumbents are concretised and kept when better).

    Short limits are enough: the aggregate model's optimum is not always the best concrete
    plan, so an early incumbent is as useful as a proven optimum; a second, longer shot runs
    only when the first was cut off. A shot starts only with 10 ms left (HiGHS needs a few
    to set up) and never runs past the deadline's remaining time.
    """
    best = sol
    statuses = []
    if shots is None:
        shots = ctx.milp_shots
    for tl in shots:
        left = deadline.left()
        if left < 0.01:
            statuses.append("skipped")
            break
        new = best
        if L.size:
            new = milp_micro_batch(
                ctx, L, tau, best, rebalance_iters_for(L.size), time_limit_s=min(tl, left), deadline=deadline
            )
        st = new.extra.get("milp_status", "none")
        statuses.append(st)
        if new.time_ms < best.time_ms - 1e-9:
            best = new
        if st != "time_limit":
            break
    best = MBSolution(best.degrees, best.members, best.time_ms, best.method, dict(best.extra), best.options)
    best.extra["milp_statuses"] = statuses
    return best
