"""The anytime planner: the exact small-cluster micro-batch solver against brute force, the one
deadline (including the issue's 64-rank budget), the gap stop, and plans no worse than the baselines.

The brute force here is independent of the planner: its own enumeration of degree multisets,
its own aligned-block placement search, every sequence -> group assignment, DESIGN.md's formulas.
"""

import itertools
import time

import numpy as np
import pytest

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.api import PlannerConfig, plan_global_batch
from megatron.flexsp.planner.baselines import batch_adaptive_plan
from megatron.flexsp.planner.bounds import lower_bound_ms, seq_tau_table
from megatron.flexsp.planner.deadline import Deadline
from megatron.flexsp.planner.flexsp import plan_flexsp
from megatron.flexsp.planner.hybrid_cp import hybrid_cp_plan
from megatron.flexsp.planner.micro_batch import PlannerContext, exact_micro_batch, solve_micro_batch
from megatron.flexsp.planner.plan import validate_plan
from megatron.flexsp.planner.presets import preset
from tests.planner._p1_util import tiny_cost


def _cost(heads: int, gpn: int, bw: dict[int, float], beta1: float = 3.0):
    return tiny_cost(gpn, heads, beta1, bandwidth_gbs=bw, name="t")


COSTS = {
    "chain-4": (lambda: _cost(8, 4, {2: 1.0, 4: 0.5, 8: 0.1}), 4),
    "chain-8": (lambda: _cost(8, 4, {2: 1.0, 4: 0.5, 8: 0.1}), 8),
    "cpu-tiny-ddp": (lambda: preset("cpu-tiny-ddp"), 4),
    # 6 GPUs per node, 12 heads: degrees 1, 2, 3, 6, 12 (no divisibility chain: placement matters)
    "odd-12": (lambda: _cost(12, 6, {2: 1.0, 3: 0.8, 6: 0.5, 12: 0.05}), 12),
}


def brute_force_micro_batch(lengths, cost, ws):
    """Least micro-batch time over every placeable degree multiset and every assignment."""
    heads, gpn = cost.num_attention_heads, cost.gpus_per_node
    degs = [
        d
        for d in range(1, ws + 1)
        if heads % d == 0
        and (d == 1 or d in cost.alltoall.bandwidth_gbs)
        and ((d <= gpn and gpn % d == 0) or (d > gpn and d % gpn == 0))
    ]

    def multisets(rest, maxd):
        if rest == 0:
            yield []
            return
        for d in degs:
            if d <= min(rest, maxd):
                for tail in multisets(rest - d, d):
                    yield [d] + tail

    def placeable(ms):
        def rec(i, free):
            if i == len(ms):
                return True
            d = ms[i]
            for k in range(ws // d):
                blk = set(range(k * d, (k + 1) * d))
                if blk <= free and rec(i + 1, free - blk):
                    return True
            return False

        return rec(0, set(range(ws)))

    cap = cost.tokens_per_gpu
    best = float("inf")
    for ms in multisets(ws, ws):
        if not placeable(ms):
            continue
        G = len(ms)
        for assign in itertools.product(range(G), repeat=len(lengths)):
            groups = [[L for L, g in zip(lengths, assign) if g == k] for k in range(G)]
            if len(lengths) >= G and any(not g for g in groups):
                continue
            if any(sum(g) > cap * d for g, d in zip(groups, ms)):
                continue
            t = max(
                cost.compute.beta1_ms
                + sum(cost.compute.alpha1_ms_per_token2 * s * s + cost.compute.alpha2_ms_per_token * s for s in g) / d
                + (
                    0.0
                    if d == 1
                    else cost.alltoall.bytes_per_token * sum(g) / d / 2**20 / cost.alltoall.bandwidth_gbs[d]
                )
                for g, d in zip(groups, ms)
                if g
            )
            best = min(best, t)
    return best


@pytest.mark.parametrize("name", sorted(COSTS))
def test_exact_micro_batch_matches_brute_force(name):
    make, ws = COSTS[name]
    cost = make()
    ctx = PlannerContext.build(cost, ws)
    assert ctx.exact
    rng = np.random.default_rng(7)
    nmax = 3 if ws >= 12 else (4 if ws == 8 else 6)
    top = cost.capacity(max(ctx.degrees))
    for _ in range(12):
        n = int(rng.integers(1, nmax + 1))
        L = np.minimum(rng.lognormal(np.log(cost.tokens_per_gpu / 2), 1.0, size=n).astype(np.int64) + 1, top)
        ref = brute_force_micro_batch(L.tolist(), cost, ws)
        sol = exact_micro_batch(ctx, L, seq_tau_table(L, cost, ctx.degrees))
        if ref == float("inf"):  # too many tokens for one micro-batch
            assert sol is None
            continue
        assert sol is not None and sol.extra["exact_proven"]
        assert sol.time_ms == pytest.approx(ref, rel=1e-9)
        # the solution is what it claims: a partition of the sequences into its groups, in memory
        assert sorted(i for m in sol.members for i in m) == list(range(n))
        assert sum(sol.degrees) == ws
        t = max(cost.group_time_ms([int(L[i]) for i in m], d) for m, d in zip(sol.members, sol.degrees) if m)
        assert t == pytest.approx(sol.time_ms)
        assert all(cost.fits(sum(int(L[i]) for i in m), d) for m, d in zip(sol.members, sol.degrees))


def test_exact_solver_stops_at_the_deadline_with_a_valid_answer():
    cost = _cost(16, 8, {2: 1.0, 4: 0.8, 8: 0.5, 16: 0.05})
    ctx = PlannerContext.build(cost, 16)
    L = longtail_lengths(
        40, max_len=2 * cost.tokens_per_gpu, median=cost.tokens_per_gpu / 5, tail_min=cost.tokens_per_gpu, seed=1
    )
    assert L.sum() <= 0.8 * cost.capacity(16)  # one micro-batch can hold them
    tau = seq_tau_table(L, cost, ctx.degrees)
    sol = exact_micro_batch(ctx, L, tau, deadline=Deadline.after(0.0), node_limit=10**9)
    # a passed deadline stops the search before it starts (the caller falls back on the greedy)
    assert sol is None
    sol = exact_micro_batch(ctx, L, tau, node_limit=2000)
    # out of nodes: what it found by then (if anything) is a valid assignment, marked unproven
    if sol is not None:
        assert not sol.extra["exact_proven"] and sol.extra["exact_nodes"] <= 2048
        assert sorted(i for m in sol.members for i in m) == list(range(L.size))
        assert all(cost.fits(sum(int(L[i]) for i in m), d) for m, d in zip(sol.members, sol.degrees))
    # the micro-batch solver then falls back on the greedy: always an answer
    got = solve_micro_batch(ctx, L, tau, deadline=Deadline.after(0.0))
    assert got is not None and sorted(i for m in got.members for i in m) == list(range(L.size))
    assert all(cost.fits(sum(int(L[i]) for i in m), d) for m, d in zip(got.members, got.degrees))


def _tiny_batches(n_batches: int):
    cost = preset("cpu-tiny-ddp")
    pool = longtail_lengths(5000, max_len=2048, seed=0)
    rng = np.random.default_rng(0)
    return cost, [pool[rng.choice(pool.size, 32, replace=False)].tolist() for _ in range(n_batches)]


def test_small_cluster_plans_beat_the_baselines_on_their_own():
    """4 ranks x 32 sequences (cpu-tiny-ddp): the solver alone, no baseline seeds, is never worse than the rules."""
    cost, batches = _tiny_batches(6)
    strictly = 0
    for L in batches:
        p = plan_flexsp(L, cost, 4, time_limit_s=1.0)
        validate_plan(p, cost, world_size=4, num_sequences=len(L))
        rule = min(hybrid_cp_plan(L, cost, 4).estimated_time_ms, batch_adaptive_plan(L, cost, 4).estimated_time_ms)
        assert p.estimated_time_ms <= rule * (1 + 1e-9)
        strictly += p.estimated_time_ms < rule * (1 - 1e-6)
        assert p.estimated_time_ms <= 1.06 * lower_bound_ms(L, cost, 4)
    assert strictly >= 4


def test_gap_stops_the_search_early():
    cost, batches = _tiny_batches(1)
    L = batches[0]
    p = plan_global_batch(L, cost, PlannerConfig(world_size=4, time_limit_s=30.0, gap=0.5))
    assert p.solver.status == "gap" and p.solver.extra["phases"] == []
    assert p.estimated_time_ms <= 1.5 * p.solver.lower_bound_ms
    with pytest.raises(ValueError, match="gap"):
        PlannerConfig(world_size=4, gap=1.5)


def test_64_ranks_512_sequences_within_the_budget():
    """The issue's budget: time_limit_s=0.05 returns a valid plan within 0.15 s (gpt-7b, long-tail lengths).

    The best of three attempts is timed: one attempt can lose the CPU to a neighbour on a shared machine.
    """
    cost = preset("gpt-7b", 64)
    L = longtail_lengths(512, max_len=196608, seed=3).tolist()
    cfg = PlannerConfig(world_size=64, time_limit_s=0.05, max_seq_len=196608)
    plan_global_batch(L[:64], cost, cfg)  # warm caches (first numpy/scipy calls)
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        p = plan_global_batch(L, cost, cfg)
        walls.append(time.perf_counter() - t0)
        validate_plan(p, cost, world_size=64, num_sequences=512)
        assert p.estimated_time_ms <= 1.6 * p.solver.lower_bound_ms
        if walls[-1] <= 0.15:
            break
    assert min(walls) <= 0.15, walls


@pytest.mark.parametrize("ws,n", [(4, 32), (64, 256)])
def test_work_budget_gives_reproducible_plans(ws, n):
    """With ``work_limit`` the clock is not consulted: the same batch gets the same plan, however busy the CPU."""
    if ws == 4:
        cost, batches = _tiny_batches(1)
        L = batches[0]
    else:
        cost = preset("gpt-7b", ws)
        L = longtail_lengths(n, max_len=196608, seed=5).tolist()
    cfg = PlannerConfig(world_size=ws, work_limit=60, time_limit_s=1e-6)  # the tiny time limit must not matter
    a = plan_global_batch(L, cost, cfg)
    b = plan_global_batch(L, cost, cfg)
    validate_plan(a, cost, world_size=ws, num_sequences=len(L))
    assert a.to_dict()["micro_batches"] == b.to_dict()["micro_batches"]
    assert a.estimated_time_ms == b.estimated_time_ms
    assert a.solver.extra["solves"] <= 60 + 1
    with pytest.raises(ValueError, match="work_limit"):
        PlannerConfig(world_size=ws, work_limit=0)
