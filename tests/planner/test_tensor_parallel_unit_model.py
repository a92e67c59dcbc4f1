"""The planner over tensor-parallel units: the unit cost model by hand, and plans over units near brute force."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.planner.flexsp import plan_flexsp
from megatron.flexsp.planner.plan import validate_plan
from megatron.flexsp.planner.presets import preset
from megatron.flexsp.planner.tensor_parallel import check_tensor_parallel, unit_cost_model
from tests.planner._p1_util import brute_plan, tiny_cost


def test_unit_model_of_gpt7b_at_tp8_by_hand():
    cost = preset("gpt-7b", 128)  # 32 layers, hidden 4096, 64 heads, 8 GPUs per node, 2-byte elements
    unit = unit_cost_model(cost, 8)
    # all-reduce link read back from the intra-node all-to-all bandwidth at degree 8: 96.5 * 7/8
    link = 96.5 * 7 / 8
    # 4 all-reduces per layer of 4096 * 2 bytes per token, a ring moves 2 * 7/8 of it
    allreduce_ms = 4 * 32 * 4096 * 2 * (2 * 7 / 8) / 2**20 / link
    assert unit.compute.alpha1_ms_per_token2 == pytest.approx(5.128e-6 / 8)
    assert unit.compute.alpha2_ms_per_token == pytest.approx(0.18396 / 8 + allreduce_ms)
    assert unit.compute.beta1_ms == pytest.approx(cost.compute.beta1_ms / 8)  # ZeRO-3 moves 1/8 of the states
    assert unit.alltoall.bytes_per_token == pytest.approx(cost.alltoall.bytes_per_token / 8)
    # 2 units span 16 GPUs on 2 nodes: the same inter-node share as the per-GPU degree 16
    assert unit.alltoall.bandwidth_gbs == {2: 10.33, 4: 5.94, 8: 4.87}
    assert unit.memory.activation_mb_per_token == pytest.approx(4.48 * (10 + 24 / 8) / 34)
    assert unit.memory.model_states_mb == cost.memory.model_states_mb
    assert (unit.num_attention_heads, unit.num_query_groups, unit.gpus_per_node) == (8, 8, 1)
    sp = unit_cost_model(cost, 8, sequence_parallel=True)
    assert sp.memory.activation_mb_per_token == pytest.approx(4.48 / 8)


def test_intra_node_unit_bandwidth_rescales_the_share_sent_away():
    cost = preset("gpt-7b", 64)
    unit = unit_cost_model(cost, 2)
    # 2 units = 4 GPUs in one node: link = bw4 * 3/4, a unit sends 1/2 of its tokens away
    assert unit.bandwidth(2) == pytest.approx(104.07 * 3 / 4 * 2 / 1)
    assert unit.bandwidth(4) == pytest.approx(96.5 * 7 / 8 * 4 / 3)
    assert unit.bandwidth(8) == pytest.approx(10.33)  # 16 GPUs: across nodes, unchanged


def test_measured_allreduce_bandwidth_is_used_when_given():
    d = preset("gpt-7b", 64).to_dict()
    d["tensor_parallel"] = {"allreduce_bandwidth_gbs": {"4": 150.0}}
    cost = CostModel.from_dict(d)
    unit = unit_cost_model(cost, 4)
    link = 150.0 * 1e9 / 1000 / 2**20
    expected = 0.18396 / 4 + 4 * 32 * 4096 * 2 * (2 * 3 / 4) / 2**20 / link
    assert unit.compute.alpha2_ms_per_token == pytest.approx(expected)
    d["tensor_parallel"] = {"allreduce_bandwidth_gbs": {"4": -1}}
    with pytest.raises(CostModelError, match="allreduce_bandwidth_gbs.4"):
        unit_cost_model(CostModel.from_dict(d), 4)


def test_tp_one_is_the_per_gpu_model():
    cost = preset("gpt-7b", 64)
    assert unit_cost_model(cost, 1) is cost


@pytest.mark.parametrize(
    "tp, world, match",
    [
        (3, 64, "does not divide the world size"),
        (0, 64, "positive integer"),
        (16, 128, "gpus_per_node"),
    ],
)
def test_impossible_tensor_parallel_sizes_are_named(tp, world, match):
    with pytest.raises(CostModelError, match=match):
        check_tensor_parallel(preset("gpt-7b", world), tp, world)


def test_heads_and_query_groups_must_split():
    d = preset("gpt-7b", 64).to_dict()
    d["num_query_groups"] = 4
    with pytest.raises(CostModelError, match="num_query_groups 4"):
        unit_cost_model(CostModel.from_dict(d), 8)


def test_plans_over_units_are_valid_at_128_gpus_tp8():
    unit = unit_cost_model(preset("gpt-7b", 128), 8)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1000, 130_000, size=64).tolist()  # 8 heads per unit: groups of at most 8 units
    plan = plan_flexsp(lengths, unit, 16, time_limit_s=2.0)
    validate_plan(plan, unit, world_size=16, num_sequences=len(lengths))
    for mb in plan.micro_batches:  # 1 unit per node: groups of 1, 2, 4, 8 or 16 whole nodes
        assert all(g.degree in unit.allowed_degrees(16) for g in mb.groups)


@pytest.mark.parametrize("seed", range(4))
def test_plans_over_units_near_brute_force(seed):
    per_gpu = tiny_cost(gpus_per_node=8, heads=8, bandwidth_gbs={2: 50.0, 4: 40.0, 8: 30.0})
    unit = unit_cost_model(per_gpu, 2)  # 8 GPUs -> 4 units of 2
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 2 * unit.capacity(2), size=int(rng.integers(1, 5))).tolist()
    lengths = [x for x in lengths if unit.smallest_degree(x, 4) is not None] or [30]
    opt = brute_plan(lengths, unit, 4)
    plan = plan_flexsp(lengths, unit, 4, time_limit_s=2.0)
    validate_plan(plan, unit, world_size=4, num_sequences=len(lengths))
    assert opt - 1e-9 <= plan.estimated_time_ms <= 1.05 * opt
