"""A lower bound on the iteration time of any valid plan, reported with every plan.

Why it is a bound: a group of degree d holding sequences S runs for
T_g = beta1 + sum_{s in S} tau(s, d), with tau(s, d) = work(s) / d + a2a(s, d), and keeps its
d GPUs busy for d * sum tau GPU-ms of sequence work. A micro-batch lasts
C = max over its non-empty groups of T_g; weighting by degree,
C >= sum_g d_g T_g / sum_g d_g = beta1 + W / sum_g d_g >= beta1 + W / world_size,
where W is the sequence GPU-ms of the micro-batch (sums over non-empty groups). Summing over
micro-batches, with every sequence at its cheapest feasible degree and at least as many
micro-batches as memory needs (a micro-batch holds at most world_size * tokens_per_gpu tokens):

    LB1 = sum_s min_d d * tau(s, d) / world_size + beta1 * ceil(sum_s s / (world_size * tokens_per_gpu))

Second bound, also valid: the micro-batch holding the longest sequence lasts at least
beta1 + min_d tau(s_max, d), every other one at least beta1:
LB2 = min_d tau(s_max, d) + beta1 * (same micro-batch count).

Third bound (LB1 and LB2 together, memory-aware): let mb* be the micro-batch holding s_max and
W* the cheapest GPU-ms of its sequences; then C(mb*) >= beta1 + max(tau*, W*/ws) and the other
micro-batches together last >= beta1 * (M - 1) + (G - W*) / ws, G the cheapest GPU-ms of the
batch. mb* holds at most ws * tokens_per_gpu tokens, so W* <= K, the fractional-knapsack
maximum of GPU-ms over that many tokens (densest sequences first); as
max(tau*, W/ws) + (G - W)/ws does not increase with W,

    LB3 = beta1 * M_min + max(tau*, K / ws) + (G - K) / ws.

It matters when the longest sequences set a micro-batch's time that memory stops the rest of
the batch from sharing. ``lower_bound_ms`` reports max(LB1, LB2, LB3); ``simple_lower_bound_ms``
is LB1 alone (the form the project's targets are stated in).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .costmodel import CostModel
from .plan import NoFeasiblePlanError

__all__ = [
    "seq_tau_table",
    "cheapest_gpu_ms",
    "min_micro_batches",
    "lower_bound_ms",
    "simple_lower_bound_ms",
    "check_feasible",
]


def seq_tau_table(lengths: Sequence[int] | np.ndarray, cost: CostModel, degrees: Sequence[int]) -> np.ndarray:
    """tau[i, k]: ms sequence i adds to a group of degree degrees[k] (work/d + all-to-all); inf if it does not fit."""
    L = np.asarray(lengths, dtype=np.float64)
    c = cost.compute
    work = c.alpha1_ms_per_token2 * L * L + c.alpha2_ms_per_token * L
    out = np.empty((L.size, len(degrees)), dtype=np.float64)
    for k, d in enumerate(degrees):
        a2a = 0.0 if d == 1 else cost.alltoall.bytes_per_token / d / 2**20 / cost.bandwidth(d)
        col = work / d + a2a * L
        col[L > cost.capacity(d)] = np.inf
        out[:, k] = col
    return out


def check_feasible(lengths: Sequence[int] | np.ndarray, cost: CostModel, world_size: int) -> None:
    """Raise NoFeasiblePlanError naming every sequence that fits in no allowed group."""
    cost.check_world_size(world_size)
    degs = cost.allowed_degrees(world_size)
    dmax = max(degs)
    cap = cost.capacity(dmax)
    L = np.asarray(lengths, dtype=np.int64)
    bad = L[L > cap]
    if bad.size:
        raise NoFeasiblePlanError(sorted(bad.tolist(), reverse=True), cap, dmax, world_size)


def min_micro_batches(lengths: Sequence[int] | np.ndarray, cost: CostModel, world_size: int) -> int:
    """Fewest micro-batches memory allows: total tokens over what all ranks hold at once (at least 1)."""
    total = int(np.asarray(lengths, dtype=np.int64).sum())
    per_mb = cost.tokens_per_gpu * world_size
    return max(1, math.ceil(total / per_mb))


def cheapest_gpu_ms(lengths: Sequence[int] | np.ndarray, cost: CostModel, world_size: int) -> np.ndarray:
    """Per sequence: min over feasible allowed degrees d of d * tau(s, d) (GPU-ms, beta1 excluded)."""
    degs = cost.allowed_degrees(world_size)
    return (seq_tau_table(lengths, cost, degs) * np.asarray(degs, dtype=np.float64)[None, :]).min(axis=1)


def _bounds(lengths, cost: CostModel, world_size: int) -> tuple[float, float, float]:
    L = np.asarray(lengths, dtype=np.int64)
    check_feasible(L, cost, world_size)
    degs = cost.allowed_degrees(world_size)
    tau = seq_tau_table(L, cost, degs)
    gpu = (tau * np.asarray(degs, dtype=np.float64)[None, :]).min(axis=1)  # cheapest_gpu_ms, tau reused below
    m = min_micro_batches(L, cost, world_size)
    beta1 = cost.compute.beta1_ms
    G = float(gpu.sum())
    lb1 = G / world_size + beta1 * m
    tau_star = float(tau.min(axis=1).max())
    lb2 = tau_star + beta1 * m
    # fractional knapsack: most GPU-ms in ws * tokens_per_gpu tokens
    budget = float(cost.tokens_per_gpu * world_size)
    order = np.argsort(-(gpu / L), kind="stable")
    cum_tok = np.cumsum(L[order].astype(np.float64))
    cum_gpu = np.cumsum(gpu[order])
    k = int(np.searchsorted(cum_tok, budget, side="right"))
    K = float(cum_gpu[k - 1]) if k else 0.0
    if k < L.size:
        left = budget - (float(cum_tok[k - 1]) if k else 0.0)
        K += gpu[order[k]] * left / float(L[order[k]])
    lb3 = beta1 * m + max(tau_star, K / world_size) + (G - K) / world_size
    return lb1, lb2, lb3


def simple_lower_bound_ms(lengths: Sequence[int] | np.ndarray, cost: CostModel, world_size: int) -> float:
    """LB1 of the module docstring: cheapest GPU-ms over all GPUs plus beta1 per memory-needed micro-batch."""
    if np.asarray(lengths).size == 0:
        return 0.0
    return _bounds(lengths, cost, world_size)[0]


def lower_bound_ms(lengths: Sequence[int] | np.ndarray, cost: CostModel, world_size: int) -> float:
    """Lower bound on the estimated iteration time of any valid plan: max(LB1, LB2, LB3), see module docstring."""
    if np.asarray(lengths).size == 0:
        return 0.0
    return max(_bounds(lengths, cost, world_size))
