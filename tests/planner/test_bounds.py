"""Lower bound: independent formula, below the brute-force optimum, below every plan; infeasible input."""

import math

import numpy as np
import pytest

from megatron.flexsp.planner.bounds import check_feasible, lower_bound_ms, min_micro_batches
from megatron.flexsp.planner.plan import NoFeasiblePlanError, PlanError
from megatron.flexsp.planner.presets import preset
from tests.planner._p1_util import brute_plan, tiny_cost


def reference_lb(lengths, cost, ws):
    """Straight from the cost-model formulas, one sequence at a time."""
    b1 = cost.compute.beta1_ms
    degs = cost.allowed_degrees(ws)
    per = []
    fastest = []
    for L in lengths:
        opts = [
            (d * (cost.group_time_ms([L], d) - b1), cost.group_time_ms([L], d) - b1) for d in degs if cost.fits(L, d)
        ]
        per.append(min(o[0] for o in opts))
        fastest.append(min(o[1] for o in opts))
    m = math.ceil(sum(lengths) / (cost.tokens_per_gpu * ws))
    # memory-aware bound: densest GPU-ms into one micro-batch's tokens (fractional knapsack)
    room, K = cost.tokens_per_gpu * ws, 0.0
    for g, L in sorted(zip(per, lengths), key=lambda x: x[0] / x[1], reverse=True):
        take = min(L, room)
        K += g * take / L
        room -= take
    G, t = sum(per), max(fastest)
    return max(G / ws + b1 * m, t + b1 * m, b1 * m + max(t, K / ws) + (G - K) / ws)


@pytest.mark.parametrize("seed", range(5))
def test_lower_bound_matches_reference_formula(seed):
    rng = np.random.default_rng(seed)
    cost = preset("gpt-7b", 64)
    L = rng.integers(100, 200_000, size=40).tolist()
    assert lower_bound_ms(L, cost, 64) == pytest.approx(reference_lb(L, cost, 64), rel=1e-12)
    assert min_micro_batches(L, cost, 64) == max(1, math.ceil(sum(L) / (cost.tokens_per_gpu * 64)))


def test_memory_aware_bound_is_tighter_when_the_longest_sequence_cannot_share():
    from megatron.flexsp.planner.bounds import simple_lower_bound_ms

    cost = preset("gpt-7b", 1024)
    L = [196608] * 4 + [2000] * 4000
    lb, simple = lower_bound_ms(L, cost, 1024), simple_lower_bound_ms(L, cost, 1024)
    assert lb == pytest.approx(reference_lb(L, cost, 1024))
    assert lb > 1.05 * simple


@pytest.mark.parametrize("seed", range(8))
def test_lower_bound_below_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    cost = tiny_cost()
    n = int(rng.integers(1, 5))
    L = rng.integers(50, 3000, size=n).tolist()
    opt = brute_plan(L, cost, 4)
    assert lower_bound_ms(L, cost, 4) <= opt + 1e-9


def test_infeasible_lengths_are_named():
    cost = preset("gpt-7b", 64)
    cap = cost.capacity(64)
    with pytest.raises(NoFeasiblePlanError) as e:
        lower_bound_ms([100, cap + 1, 5, cap + 7], cost, 64)
    assert e.value.lengths == [cap + 7, cap + 1]
    assert e.value.max_capacity == cap and e.value.max_degree == 64
    assert str(cap + 7) in str(e.value) and str(cap) in str(e.value)
    assert isinstance(e.value, PlanError)
    # on a smaller world the largest group is smaller
    c8 = preset("gpt-7b", 8)
    with pytest.raises(NoFeasiblePlanError, match=str(c8.capacity(8))):
        check_feasible([c8.capacity(8) + 1, 10], c8, 8)
    check_feasible([c8.capacity(8)], c8, 8)
    assert lower_bound_ms([], cost, 64) == 0.0
