"""Baselines: valid plans, static/batch-adaptive degree choice and packing, Megatron hybrid-CP rule."""

import warnings

import numpy as np
import pytest

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.baselines import (
    batch_adaptive_plan,
    fill_empty_groups,
    homogeneous_degrees,
    homogeneous_plan,
    static_plan,
)
from megatron.flexsp.planner.costmodel import build_cost_model
from megatron.flexsp.planner.hybrid_cp import (
    balanced_cp_rounds,
    hybrid_cp_plan,
    megatron_gpus_needed,
    rounds_to_rank_lists,
)
from megatron.flexsp.planner.placement import candidate_groups
from megatron.flexsp.planner.plan import (
    Group,
    MicroBatch,
    NoFeasiblePlanError,
    PlanError,
    estimate_plan_ms,
    validate_plan,
)
from megatron.flexsp.planner.presets import preset
from tests.planner._p1_util import small_cost

SCENARIOS = [
    ("cpu-tiny", preset("cpu-tiny"), 4, 16, 1500),
    ("small-8", small_cost(), 8, 40, 7000),
    ("gpt-7b-64", preset("gpt-7b", 64), 64, 256, 196608),
    ("gpt-7b-24", preset("gpt-7b", 24), 24, 96, 40000),
]


def _groups_ok(plan, cost, ws):
    allowed = set(candidate_groups(cost, ws))
    for mb in plan.micro_batches:
        for g in mb.groups:
            assert tuple(g.ranks) in allowed


@pytest.mark.parametrize("name,cost,ws,n,max_len", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_every_baseline_validates_on_random_batches(name, cost, ws, n, max_len):
    for seed in range(4):
        lengths = longtail_lengths(n, max_len=max_len, seed=seed, min_len=1).tolist()
        plans = [
            static_plan(lengths, cost, ws, max_seq_len=max_len),
            batch_adaptive_plan(lengths, cost, ws),
            hybrid_cp_plan(lengths, cost, ws),
        ]
        for p in plans:
            validate_plan(p, cost, world_size=ws, num_sequences=n)
            _groups_ok(p, cost, ws)
            assert p.estimated_time_ms == pytest.approx(estimate_plan_ms(p, cost))
        s, b, _ = plans
        assert len({g.degree for mb in s.micro_batches for g in mb.groups}) == 1
        assert len({g.degree for mb in b.micro_batches for g in mb.groups}) == 1
        assert b.estimated_time_ms <= s.estimated_time_ms + 1e-9  # batch-adaptive searches a superset of degrees


def test_static_degree_choice_and_forcing():
    cost = small_cost()
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 900, size=30).tolist()
    # max_seq_len 3000 needs degree >= 4 (1000 tokens per GPU); static keeps the best of 4 and 8
    p = static_plan(lengths, cost, 8, max_seq_len=3000)
    ref = min((homogeneous_plan(lengths, cost, 8, d) for d in (4, 8)), key=lambda q: q.estimated_time_ms)
    assert p.estimated_time_ms == pytest.approx(ref.estimated_time_ms)
    assert p.solver.extra["degree"] in (4, 8) and p.solver.method == "static"
    forced = static_plan(lengths, cost, 8, max_seq_len=3000, degree=2)
    assert {g.degree for mb in forced.micro_batches for g in mb.groups} == {2}
    ba = batch_adaptive_plan(lengths, cost, 8)  # every length fits degree 1: all degrees compete
    ref = min((homogeneous_plan(lengths, cost, 8, d) for d in (1, 2, 4, 8)), key=lambda q: q.estimated_time_ms)
    assert ba.estimated_time_ms == pytest.approx(ref.estimated_time_ms)
    assert ba.estimated_time_ms <= p.estimated_time_ms
    with pytest.raises(PlanError, match="degree 3 is not usable on 8 ranks"):
        static_plan(lengths, cost, 8, degree=3)
    with pytest.raises(PlanError, match="longer than max_seq_len 500"):
        static_plan(lengths, cost, 8, max_seq_len=500)
    with pytest.raises(NoFeasiblePlanError, match=r"length\(s\) \[1500\]"):
        static_plan([1500, 10], cost, 8, degree=1)


def test_homogeneous_packing_reaches_the_obvious_optimum():
    cost = small_cost()
    # 16 sequences of 500 tokens on 8 degree-1 groups of 1000 tokens: one micro-batch, two per rank
    p = homogeneous_plan([500] * 16, cost, 8, 1)
    assert p.num_micro_batches == 1
    assert p.estimated_time_ms == pytest.approx(cost.group_time_ms([500, 500], 1))
    # 17 sequences need a second micro-batch; the best has one sequence in it
    p = homogeneous_plan([500] * 17, cost, 8, 1)
    assert p.num_micro_batches == 2
    assert p.estimated_time_ms == pytest.approx(cost.group_time_ms([500, 500], 1) + cost.group_time_ms([500], 1))


def _optimal_bins(lengths, cap):
    """Exact bin packing by DP over subsets (tiny instances only)."""
    n = len(lengths)
    full = (1 << n) - 1
    sums = [0] * (1 << n)
    for m in range(1, 1 << n):
        low = m & -m
        sums[m] = sums[m ^ low] + lengths[low.bit_length() - 1]
    best = [0] + [n + 1] * full
    for m in range(1, 1 << n):
        low = m & -m
        rest = m ^ low
        sub = rest
        while True:  # bins containing the lowest item of m
            b = sub | low
            if sums[b] <= cap and best[m ^ b] + 1 < best[m]:
                best[m] = best[m ^ b] + 1
            if sub == 0:
                break
            sub = (sub - 1) & rest
    return best[full]


def test_homogeneous_micro_batches_against_exact_bin_packing():
    """Micro-batches of a homogeneous plan vs exact bin packing: never fewer than ceil(OPT / groups)
    (memory), never more than best-fit-decreasing's guarantee 11/9 OPT + 6/9 bins allows."""
    cost = small_cost()
    rng = np.random.default_rng(1)
    equal = 0
    for _ in range(25):
        lengths = rng.integers(300, 3000, size=10).tolist()
        opt = _optimal_bins(lengths, cost.capacity(4))
        p = homogeneous_plan(lengths, cost, 8, 4)  # 2 groups of 4000 tokens per micro-batch
        validate_plan(p, cost)
        lo, hi = -(-opt // 2), -(-int(11 / 9 * opt + 6 / 9) // 2)
        assert lo <= p.num_micro_batches <= hi, (lengths, opt, p.num_micro_batches)
        equal += p.num_micro_batches == lo
    assert equal >= 20  # BFD reaches the optimum on nearly all random instances


def test_fill_empty_groups_moves_a_sequence():
    cost = small_cost()
    lengths = [100, 200, 300]
    mb = MicroBatch([Group([0, 1], [0, 1, 2]), Group([2, 3], []), Group([4, 5, 6, 7], [])])
    fill_empty_groups(mb, lengths, cost)
    assert all(g.sequences for g in mb.groups)
    assert sorted(s for g in mb.groups for s in g.sequences) == [0, 1, 2]


def test_homogeneous_degrees_tile_the_world():
    cost = preset("gpt-7b", 24)
    assert sorted(homogeneous_degrees(cost, 24)) == [1, 2, 4, 8]  # 16 does not tile 24 ranks


# --------------------------------------------------------------------------- hybrid CP


class _FakeGroup:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_balanced_cp_rule_matches_megatron_core_class():
    pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.pipeline_parallel.hybrid_cp_schedule import BalancedCPScheduler
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(120):
        ws = int(rng.choice([2, 4, 8, 16, 32]))
        per = int(rng.integers(100, 2000))
        n = int(rng.integers(1, 60))
        lengths = np.minimum(rng.lognormal(np.log(per * 0.5), 1.5, size=n).astype(int) + 1, per * ws).tolist()
        sched = BalancedCPScheduler(per, _FakeGroup(ws))
        _, ref = sched.get_groups_and_subsamples([(i, L) for i, L in enumerate(lengths)], None)
        mine = rounds_to_rank_lists(
            balanced_cp_rounds(lengths, ws, need=lambda L, per=per: megatron_gpus_needed(L, per)), ws
        )
        assert mine == [[list(x) for x in r] for r in ref], (trial, ws, per, lengths)
        checked += 1
    assert checked == 120


def test_hybrid_cp_degrees_follow_the_rule():
    cost = preset("gpt-7b", 64)
    per = cost.tokens_per_gpu
    lengths = longtail_lengths(512, max_len=196608, seed=5).tolist()
    plan = hybrid_cp_plan(lengths, cost, 64)
    validate_plan(plan, cost)
    rounds = balanced_cp_rounds(
        lengths,
        64,
        need=lambda L: megatron_gpus_needed(L, per),
        fits=lambda t, d: cost.fits(t, d),
        grow=lambda s, idle: next((d for d in (1, 2, 4, 8, 16, 32, 64) if s < d <= s + idle), None),
    )
    assert plan.num_micro_batches == len(rounds)
    for mb, groups in zip(plan.micro_batches, rounds):
        got = sorted((g.degree, tuple(sorted(g.sequences))) for g in mb.groups if g.sequences)
        want = sorted((g.size, tuple(sorted(s for s, _ in g.items))) for g in groups if g.items)
        assert got == want
    # a sequence never runs on fewer ranks than Megatron's CP size for it
    for mb in plan.micro_batches:
        for g in mb.groups:
            for s in g.sequences:
                assert g.degree >= megatron_gpus_needed(lengths[s], per)


def test_hybrid_cp_infeasible_and_empty():
    cost = small_cost()
    with pytest.raises(NoFeasiblePlanError, match=r"\[9000\]"):
        hybrid_cp_plan([100, 9000], cost, 8)
    with pytest.raises(PlanError, match="empty global batch"):
        hybrid_cp_plan([], cost, 8)
    with pytest.raises(PlanError, match="empty global batch"):
        batch_adaptive_plan([], cost, 8)


def test_hybrid_cp_defers_a_sequence_when_idle_ranks_cannot_take_one():
    # degrees {1, 4} on 6 ranks (2 per node): a degree-4 group cannot grow, so ranks stay idle
    cost = build_cost_model(
        name="c6",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        gpus_per_node=2,
        alpha1_ms_per_token2=1e-6,
        alpha2_ms_per_token=0.01,
        beta1_ms=1.0,
        bandwidth_gbs={4: 1.0},
        limit_gb=1.0,
        model_states_mb=24.0,
        activation_mb_per_token=1000 / 2200,
    )  # 2200 tokens per GPU
    assert cost.tokens_per_gpu == 2200 and cost.allowed_degrees(6) == [1, 4]
    # the rule puts 4000 + 4000 in one degree-4 group and 100 on one rank; the sixth rank is idle,
    # and neither 4000 fits it: one 4000 is deferred to its own micro-batch
    rule = balanced_cp_rounds(
        [4000, 4000, 100],
        6,
        need=lambda L: 4 if L > 2200 else 1,
        grow=lambda s, idle: 4 if s < 4 <= s + idle else None,
        fits=cost.fits,
    )
    assert [[(g.size, len(g.items)) for g in r] for r in rule] == [[(4, 2), (1, 1)]]  # the rule: one round
    plan = hybrid_cp_plan([4000, 4000, 100], cost, 6)
    validate_plan(plan, cost, world_size=6, num_sequences=3)
    assert plan.num_micro_batches == 2
    assert plan.solver.extra["rounds"] == 2
    firsts = sorted((g.degree, tuple(g.sequences)) for g in plan.micro_batches[0].groups)
    assert firsts == [(1, ()), (1, (2,)), (4, (0,))]
