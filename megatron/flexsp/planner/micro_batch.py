"""Solving ONE micro-batch: which SP groups (degrees) and which sequences each group runs.

Why a front door of its own: the global-batch search (``global_batch.py``) evaluates thousands
of candidate micro-batches, so this is the planner's inner loop. It picks a solver from
``micro/``, one module each:

* greedy (``micro.greedy``, any world size): degree classes by bisection on the target time,
  dealt longest first, then a local search of moves and swaps (``micro.groups``);
* exact (``micro.exact``, small clusters): every placeable group structure, branch and bound
  per structure; the optimum when it finishes (``extra["exact_proven"]``);
* MILP (``micro.milp``, any world size): bucketed lengths in short time-limited shots, its
  counts dealt by the greedy's machinery; kept only when better.

Every function takes an optional ``Deadline`` and returns the best it has when it passes. The
names below are re-exported for the trainer, the tests and scripts that import them from here.
"""

from __future__ import annotations

import numpy as np

from .deadline import Deadline
from .micro.context import EXACT_MAX_WORLD, Chunk, MBSolution, PlannerContext
from .micro.exact import exact_micro_batch, mb_lower_bound
from .micro.greedy import greedy
from .micro.milp import (
    BUCKET_ERROR,
    MAX_BUCKETS,
    MILP_SPAN,
    MILP_TIME_LIMIT_S,
    milp_micro_batch,
    milp_shots,
    rebalance_iters_for,
)

__all__ = [
    "PlannerContext",
    "MBSolution",
    "Chunk",
    "solve_micro_batch",
    "exact_micro_batch",
    "milp_shots",
    "EXACT_MAX_WORLD",
    "mb_lower_bound",
]


def _heuristic(
    ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, iters: int, quick: bool, exact: bool, deadline: Deadline | None
) -> MBSolution | None:
    """Exact on small clusters (the greedy too when the exact search stopped early), else the greedy."""
    if not exact:
        return greedy(ctx, L, tau, iters, quick, deadline)
    best = exact_micro_batch(ctx, L, tau, deadline=deadline)
    if best is None or not best.extra.get("exact_proven"):  # stopped early: the greedy may do better
        alt = greedy(ctx, L, tau, iters, True, deadline)
        if alt is not None and (best is None or alt.time_ms < best.time_ms - 1e-9):
            best = alt
    return best


def _first_mode(
    ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, iters: int, quick: bool, exact: bool, deadline: Deadline | None
) -> MBSolution | None:
    """Several recompute modes: the solve with the options of the first mode (fastest first) that holds every
    sequence of the micro-batch alone; None with one mode."""
    if len(ctx.modes) == 1:
        return None
    for mode in ctx.modes:
        t1 = tau.copy()
        t1[:, [k for k, m in enumerate(ctx.option_modes) if m != mode]] = np.inf
        if np.isfinite(t1).any(axis=1).all():
            return _heuristic(ctx, L, t1, iters, quick, exact, deadline)
    return None


def solve_micro_batch(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    *,
    use_milp: bool = False,
    time_limit_s: float = MILP_TIME_LIMIT_S,
    upper: MBSolution | None = None,
    rebalance_iters: int | None = None,
    bucket_error: float = BUCKET_ERROR,
    max_buckets: int | None = MAX_BUCKETS,
    milp_span: int | None = MILP_SPAN,
    quick: bool = False,
    exact: bool | None = None,
    deadline: Deadline | None = None,
) -> MBSolution | None:
    """Best groups for one micro-batch (``L`` lengths, ``tau`` their tau table); None if the heuristics fail.

    ``exact`` (default: on small clusters) solves by structure enumeration + branch and bound;
    ``upper`` is a known solution to beat (then only the MILP runs); ``quick`` polishes only the
    greedy's best structure.
    """
    iters = rebalance_iters if rebalance_iters is not None else rebalance_iters_for(L.size)
    best = upper
    if best is None and L.size:
        ex = ctx.exact if exact is None else exact
        # several modes: never worse than the fastest mode that holds the micro-batch alone; a quick solve
        # (scoring cuts) stops there, so cuts cost what they cost with one mode
        first = _first_mode(ctx, L, tau, iters, quick, ex, deadline)
        if first is None or not quick:
            best = _heuristic(ctx, L, tau, iters, quick, ex, deadline)
        if first is not None and (best is None or first.time_ms < best.time_ms - 1e-9):
            best = first
    if not use_milp or L.size == 0:
        return best
    return milp_micro_batch(
        ctx,
        L,
        tau,
        best,
        iters,
        time_limit_s=time_limit_s,
        bucket_error=bucket_error,
        max_buckets=max_buckets,
        milp_span=milp_span,
        deadline=deadline,
    )
