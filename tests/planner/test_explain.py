"""The per-plan breakdown: hand-worked cases, and the rows add up to the cost model's estimate."""

import pytest

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.baselines import batch_adaptive_plan, static_plan
from megatron.flexsp.planner.bounds import simple_lower_bound_ms
from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.dynamic_cp import dynamic_cp_plan
from megatron.flexsp.planner.explain import breakdown, explain_table
from megatron.flexsp.planner.hybrid_cp import hybrid_cp_plan
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan, estimate_plan_ms
from megatron.flexsp.planner.presets import preset

# 1 ms per token at any degree, beta1 10 ms; all-to-all T / (d * bw) ms with bw 1 GB/s at d=2, 0.5 at d=4;
# 1000 tokens per GPU
HAND = CostModel.from_dict(
    {
        "name": "hand",
        "num_layers": 1,
        "hidden_size": 8,
        "num_attention_heads": 4,
        "num_query_groups": 4,
        "gpus_per_node": 4,
        "compute": {"alpha1_ms_per_token2": 0.0, "alpha2_ms_per_token": 1.0, "beta1_ms": 10.0},
        "alltoall": {"bytes_per_token": 2**20, "bandwidth_gbs": {"2": 1.0, "4": 0.5}},
        "memory": {"limit_gb": 1.0, "model_states_mb": 24.0, "activation_mb_per_token": 1.0},
    }
)


def test_one_micro_batch_with_a_wide_group_and_idle_singletons():
    # seq 0 (1000 tokens) on 2 ranks: 500 compute + 500 a2a + 10 = 1010 ms; seqs 1, 2 alone: 110 ms each.
    # cheapest GPU-ms 1000 + 100 + 100; used 2000 + 200 -> degree loss 1000 / 4 = 250; LB1 = 1200/4 + 10 = 310;
    # the lower bound (seq 0 alone: min tau 750 at d=4, + 10) = 760, so 450 of the 1800/4 idle is forced.
    plan = Plan(4, [1000, 100, 100], [MicroBatch([Group([0, 1], [0]), Group([2], [1]), Group([3], [2])])])
    b = breakdown(plan, HAND)
    assert b.total_ms == pytest.approx(1010.0) == estimate_plan_ms(plan, HAND)
    assert (b.unavoidable_ms, b.degree_ms, b.extra_micro_batches_ms) == pytest.approx((310.0, 250.0, 0.0))
    assert (b.memory_packing_ms, b.imbalance_ms) == pytest.approx((450.0, 0.0))


def test_two_micro_batches_with_empty_groups():
    # mb 1: seq 0 on 4 ranks, 250 + 500 + 10 = 760; mb 2: seqs 1, 2 alone (110 each), two empty ranks idle 110.
    # degree loss (4 * 750 - 1000) / 4 = 500; fixed (4 + 2) * 10 / 4 = 15, memory needs 1 mb -> 5 extra;
    # idle 220 / 4 = 55, all of it within what the bound forces (450)
    plan = Plan(
        4,
        [1000, 100, 100],
        [
            MicroBatch([Group([0, 1, 2, 3], [0])]),
            MicroBatch([Group([0], [1]), Group([1], [2]), Group([2], []), Group([3], [])]),
        ],
    )
    b = breakdown(plan, HAND)
    assert b.total_ms == pytest.approx(870.0) == estimate_plan_ms(plan, HAND)
    assert (b.unavoidable_ms, b.degree_ms, b.extra_micro_batches_ms) == pytest.approx((310.0, 500.0, 5.0))
    assert (b.memory_packing_ms, b.imbalance_ms) == pytest.approx((55.0, 0.0))


@pytest.mark.parametrize("world", [16, 64])
def test_rows_add_up_to_the_estimate_for_every_peer(world):
    cost = preset("gpt-7b", world)
    lengths = [min(int(x), cost.capacity(world)) for x in longtail_lengths(world * 4, max_len=131072, seed=5)]
    plans = {
        "static": static_plan(lengths, cost, world),
        "batch-adaptive": batch_adaptive_plan(lengths, cost, world),
        "megatron-hybrid-cp": hybrid_cp_plan(lengths, cost, world),
        "megatron-dynamic-cp": dynamic_cp_plan(lengths, cost, world),
    }
    for plan in plans.values():
        b = breakdown(plan, cost)
        parts = (b.unavoidable_ms, b.degree_ms, b.extra_micro_batches_ms, b.memory_packing_ms, b.imbalance_ms)
        assert sum(parts) == pytest.approx(estimate_plan_ms(plan, cost), rel=1e-9)
        assert b.unavoidable_ms == pytest.approx(simple_lower_bound_ms(lengths, cost, world), rel=1e-9)
        assert min(parts) >= -1e-6
    table = explain_table(plans, cost)
    assert all(name in table for name in plans) and "degree (a2a)" in table
