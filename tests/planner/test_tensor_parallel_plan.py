"""Contract C6: plans over tensor-parallel units carry ``tensor_parallel_size``, validate over units, and every
method's groups expand to GPUs without splitting a node's units."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron.flexsp.planner.api import METHODS, PlannerConfig, fallback_plan, plan_global_batch
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan, PlanError, estimate_plan_ms, validate_plan
from megatron.flexsp.planner.tensor_parallel import unit_cost_model, unit_gpu_ranks
from tests.planner._p1_util import tiny_cost


def _plan(groups: list[list[int]], ws: int, tp: int, n: int = 4) -> Plan:
    seqs = [list(range(k, n, len(groups))) for k in range(len(groups))]
    return Plan(ws, [100] * n, [MicroBatch([Group(g, s) for g, s in zip(groups, seqs)])], tensor_parallel_size=tp)


def test_round_trip_writes_the_field_only_above_one():
    p = _plan([[0, 1], [2], [3]], ws=8, tp=2)
    d = json.loads(p.to_json())
    assert d["tensor_parallel_size"] == 2 and d["world_size"] == 8
    back = Plan.from_json(p.to_json())
    assert back.tensor_parallel_size == 2 and back.num_units == 4
    assert back.to_dict() == p.to_dict()
    one = _plan([[0, 1], [2], [3]], ws=4, tp=1)
    assert "tensor_parallel_size" not in one.to_dict()
    assert Plan.from_json(one.to_json()).tensor_parallel_size == 1  # absent reads as 1


@pytest.mark.parametrize("bad", [0, -2, 2.0, "2", True, None])
def test_malformed_tensor_parallel_size_is_rejected(bad):
    d = _plan([[0, 1], [2], [3]], ws=8, tp=2).to_dict()
    d["tensor_parallel_size"] = bad
    with pytest.raises(PlanError, match="tensor_parallel_size"):
        Plan.from_dict(d)


def test_validation_counts_units_not_gpus():
    validate_plan(_plan([[0, 1], [2], [3]], ws=8, tp=2), world_size=8, num_sequences=4)
    with pytest.raises(PlanError, match="outside 0..3"):  # unit 4 does not exist on 8 GPUs at TP 2
        validate_plan(_plan([[0, 1], [2], [4]], ws=8, tp=2))
    with pytest.raises(PlanError, match=r"ranks \[3\] are in no group"):
        validate_plan(_plan([[0, 1], [2]], ws=8, tp=2))
    with pytest.raises(PlanError, match="does not divide the world size 6"):
        validate_plan(_plan([[0], [1]], ws=6, tp=4))
    with pytest.raises(PlanError, match="positive integer"):
        validate_plan(_plan([[0], [1]], ws=6, tp=0))


def test_per_gpu_cost_model_checks_the_units_topology():
    per_gpu = tiny_cost(gpus_per_node=4, heads=8)  # 2 units of TP 2 per node
    validate_plan(_plan([[0, 1], [2], [3]], ws=8, tp=2), per_gpu)
    with pytest.raises(PlanError, match="must lie in one node"):  # units 1 and 2 are on nodes 0 and 1
        validate_plan(_plan([[1, 2], [0], [3]], ws=8, tp=2), per_gpu)
    unit4 = unit_cost_model(tiny_cost(gpus_per_node=4, heads=8), 4)
    with pytest.raises(PlanError, match="units of TP 4"):
        validate_plan(_plan([[0, 1], [2], [3]], ws=8, tp=2), unit4)
    with pytest.raises(PlanError, match="does not divide num_attention_heads"):
        validate_plan(_plan([[0], [1]], ws=6, tp=3, n=2), tiny_cost(gpus_per_node=6, heads=8))


def _expanded_groups_respect_nodes(plan: Plan, gpus_per_node: int) -> None:
    """The GPU view, computed from rank numbers alone: every GPU once per micro-batch, each unit inside one
    node, a group of at most a node's GPUs inside one node, a larger one over whole nodes."""
    t = plan.tensor_parallel_size
    for mb in plan.micro_batches:
        gpus = sorted(r for g in mb.groups for r in unit_gpu_ranks(g.ranks, t))
        assert gpus == list(range(plan.world_size))
        for g in mb.groups:
            ranks = unit_gpu_ranks(g.ranks, t)
            for u in g.ranks:
                assert len({r // gpus_per_node for r in ranks if r // t == u}) == 1
            nodes = {r // gpus_per_node for r in ranks}
            if len(ranks) <= gpus_per_node:
                assert len(nodes) == 1
            else:
                assert len(ranks) == len(nodes) * gpus_per_node


@pytest.mark.parametrize("method", METHODS)
def test_every_method_plans_whole_units(method):
    per_gpu = tiny_cost(gpus_per_node=4, heads=8, bandwidth_gbs={2: 1.0, 4: 0.5, 8: 0.1, 16: 0.05})
    unit = unit_cost_model(per_gpu, 2)  # 16 GPUs = 8 units of 2, 2 units per node
    rng = np.random.default_rng(3)
    lengths = rng.integers(50, unit.capacity(4), size=12).tolist()  # 4 heads per unit: degree <= 4
    cfg = PlannerConfig(world_size=8, method=method, time_limit_s=1.0)
    plan = plan_global_batch(lengths, unit, cfg)
    assert (plan.tensor_parallel_size, plan.world_size, plan.num_units) == (2, 16, 8)
    validate_plan(plan, unit, world_size=16, num_sequences=len(lengths))
    validate_plan(Plan.from_json(plan.to_json()), per_gpu, world_size=16)  # same checks from the per-GPU model
    assert estimate_plan_ms(plan, unit) == pytest.approx(plan.estimated_time_ms)
    _expanded_groups_respect_nodes(plan, 4)


def test_fallback_plan_is_stamped_too():
    unit = unit_cost_model(tiny_cost(gpus_per_node=4, heads=8), 4)
    plan = fallback_plan([300, 200, 100, 900], unit, PlannerConfig(world_size=4, method="flexsp"))
    assert (plan.tensor_parallel_size, plan.world_size) == (4, 16)
    _expanded_groups_respect_nodes(plan, 4)


def test_recompute_modes_scale_by_what_tp_splits():
    from megatron.flexsp.planner.presets import preset
    from megatron.flexsp.planner.prior import ModelShape, with_recompute_modes

    shape = ModelShape(num_layers=32, hidden_size=4096, num_attention_heads=64, vocab_size=50257)
    cost = with_recompute_modes(preset("gpt-7b", 64), shape, modules=("core_attn", "mlp"))
    sel, full = (cost.recompute[m].activation_mb_per_token for m in ("selective", "full"))
    unit = unit_cost_model(cost, 4)
    share = (10 + 24 / 4) / 34  # Korthikanti et al.: 10 of 34 per-layer units stay replicated without SP
    assert unit.recompute["selective"].activation_mb_per_token == pytest.approx(sel * share)
    assert unit.recompute["full"].activation_mb_per_token == pytest.approx(full)  # layer inputs: replicated
    sp = unit_cost_model(cost, 4, sequence_parallel=True)
    assert sp.recompute["full"].activation_mb_per_token == pytest.approx(full / 4)
    assert sp.recompute["selective"].activation_mb_per_token == pytest.approx(sel / 4)
    assert unit.recompute["full"].compute_factor == cost.recompute["full"].compute_factor


def test_a_unit_model_is_never_divided_twice():
    from megatron.flexsp.planner.costmodel import CostModel, CostModelError

    unit = unit_cost_model(tiny_cost(gpus_per_node=4, heads=8), 2)
    again = CostModel.from_dict(json.loads(json.dumps(unit.to_dict())))  # saved and read back
    assert unit_cost_model(again, 2).to_dict() == unit.to_dict()
    for t in (1, 4):
        with pytest.raises(CostModelError, match="is over units of TP 2"):
            unit_cost_model(again, t)
