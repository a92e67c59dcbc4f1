"""Recompute fields of the cost model (contract C4) and of the plan (contract C3): validation, round trips,
formulas recomputed by hand, and old JSON that stays valid and unchanged."""

from __future__ import annotations

import copy
import json
import math

import pytest

from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan, PlanError, estimate_plan_ms, validate_plan
from tests.planner._p1_util import tiny_cost

RECOMPUTE = {
    "selective": {"activation_mb_per_token": 0.5, "compute_factor": 1.05, "alltoall_factor": 1.0},
    "full": {"activation_mb_per_token": 0.1, "compute_factor": 1.33, "alltoall_factor": 1.5},
}


def rc_cost(modes=("selective", "full")) -> CostModel:
    d = tiny_cost().to_dict()
    d["recompute"] = {m: dict(RECOMPUTE[m]) for m in modes}
    return CostModel.from_dict(d)


def test_old_json_unchanged_and_mode_none_is_the_top_level():
    base = tiny_cost()
    d = base.to_dict()
    assert "recompute" not in d
    assert base.modes == ("none",)
    assert base.for_mode("none") is base
    assert CostModel.from_dict(json.loads(json.dumps(d))).to_dict() == d


def test_round_trip_keeps_modes_and_unknown_entry_keys():
    d = rc_cost().to_dict()
    d["recompute"]["full"]["measured_on"] = "4 cpu ranks"
    c = CostModel.from_dict(json.loads(json.dumps(d)))
    assert c.to_dict() == d
    assert c.modes == ("none", "selective", "full")
    assert CostModel.from_dict(rc_cost(("full",)).to_dict()).modes == ("none", "full")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.__setitem__("recompute", [1]), "'recompute' must be an object"),
        (lambda r: r["recompute"].__setitem__("partial", {}), "'recompute.partial' is not a recompute mode"),
        (lambda r: r["recompute"].__setitem__("full", 3), "'recompute.full' must be an object"),
        (lambda r: r["recompute"]["full"].pop("compute_factor"), "'recompute.full.compute_factor'"),
        (lambda r: r["recompute"]["full"].pop("alltoall_factor"), "'recompute.full.alltoall_factor'"),
        (
            lambda r: r["recompute"]["selective"].__setitem__("activation_mb_per_token", 0),
            "'recompute.selective.activation_mb_per_token' must be a finite number > 0",
        ),
        (lambda r: r["recompute"]["full"].__setitem__("compute_factor", math.nan), "'recompute.full.compute_factor'"),
        (lambda r: r["recompute"]["full"].__setitem__("alltoall_factor", True), "'recompute.full.alltoall_factor'"),
    ],
)
def test_bad_recompute_fields_are_named(mutate, field):
    d = copy.deepcopy(rc_cost().to_dict())
    mutate(d)
    with pytest.raises(CostModelError, match=field.replace("(", r"\(").replace(".", r"\.")):
        CostModel.from_dict(d)


def test_mode_formulas_by_hand():
    """compute: alpha terms x compute_factor, beta1 unchanged; a2a x alltoall_factor; memory with the mode's act."""
    c = rc_cost()
    a1, a2, b1 = c.compute.alpha1_ms_per_token2, c.compute.alpha2_ms_per_token, c.compute.beta1_ms
    lens, d = [300, 500], 2
    work = sum(a1 * s * s + a2 * s for s in lens)
    a2a = c.alltoall.bytes_per_token * 800 / d / 2**20 / c.alltoall.bandwidth_gbs[d]
    for mode, cf, af, act in (("none", 1.0, 1.0, 1.0), ("selective", 1.05, 1.0, 0.5), ("full", 1.33, 1.5, 0.1)):
        assert c.compute_ms(lens, d, mode) == pytest.approx(cf * work / d + b1, rel=1e-12)
        assert c.alltoall_ms(800, d, mode) == pytest.approx(af * a2a, rel=1e-12)
        assert c.group_time_ms(lens, d, mode) == pytest.approx(cf * work / d + b1 + af * a2a, rel=1e-12)
        assert c.memory_mb(800, d, mode) == pytest.approx(24.0 + act * 800 / d, rel=1e-12)
        assert c.capacity(d, mode) == d * math.floor((1024 - 24.0) / act + 1e-9)
    # none with recompute fields present: exactly the plain model's numbers
    assert c.group_time_ms(lens, d) == tiny_cost().group_time_ms(lens, d)
    with pytest.raises(CostModelError, match="no recompute mode 'full'"):
        tiny_cost().group_time_ms(lens, d, "full")


def test_best_mode_is_the_fastest_that_fits():
    c = rc_cost()
    assert c.best_mode([900], 1) == "none"  # fits without recomputation
    assert c.best_mode([1500], 1) == "selective"  # needs 1500 MB without, 750 with selective
    assert c.best_mode([5000], 1) == "full"
    assert c.best_mode([20000], 1) is None
    assert c.best_mode([1500], 1, ("none", "full")) == "full"


def test_envelope_is_optimistic_for_every_mode():
    c = rc_cost()
    env = c.envelope(c.modes)
    for mode in c.modes:
        for lens, d in (([100, 900], 1), ([3000], 4), ([64, 64, 700], 2)):
            assert env.group_time_ms(lens, d) <= c.group_time_ms(lens, d, mode) + 1e-12
        assert env.capacity(4) >= c.capacity(4, mode)
    assert c.envelope(["full"]).to_dict() == {k: v for k, v in c.for_mode("full").to_dict().items()}


def _plan(mode_of_group0: str) -> Plan:
    return Plan(
        4,
        [1500, 200, 300],
        [MicroBatch([Group([0], [0], mode_of_group0), Group([1], [1]), Group([2, 3], [2])])],
    )


def test_plan_field_round_trip_and_absent_reads_none():
    p = _plan("full")
    d = p.to_dict()
    assert d["micro_batches"][0]["groups"][0]["recompute"] == "full"
    assert "recompute" not in d["micro_batches"][0]["groups"][1]  # only when not "none"
    q = Plan.from_json(p.to_json())
    assert [g.recompute for g in q.micro_batches[0].groups] == ["full", "none", "none"]
    assert Plan.from_dict(_plan("none").to_dict()).to_dict() == _plan("none").to_dict()


def test_plan_mode_validated():
    d = _plan("full").to_dict()
    d["micro_batches"][0]["groups"][0]["recompute"] = "partial"
    with pytest.raises(PlanError, match="recompute'.*'partial' is not a recompute mode"):
        Plan.from_dict(d)
    with pytest.raises(PlanError, match="recompute 'bogus'"):
        validate_plan(_plan("bogus"))


def test_plan_memory_and_estimate_use_the_group_mode():
    c = rc_cost()
    with pytest.raises(PlanError, match="1500 tokens need 1524.0 MB"):
        validate_plan(_plan("none"), c)  # 1500 tokens on one GPU without recomputation: over 1 GB
    validate_plan(_plan("full"), c)
    with pytest.raises(PlanError, match="recompute mode 'full' is not in the cost model"):
        validate_plan(_plan("full"), tiny_cost())
    expect = max(c.group_time_ms([1500], 1, "full"), c.group_time_ms([200], 1), c.group_time_ms([300], 2))
    assert estimate_plan_ms(_plan("full"), c) == pytest.approx(expect, rel=1e-12)


def test_prior_recompute_section_by_hand():
    """2 layers, hidden 64, 4 heads in 2 groups, FFN 256 SwiGLU, vocabulary 1000, bf16 (numbers worked out
    by hand from the docstring's counts: per layer A = 2 (7*64 + 2*64*2/4 + 3*256) = 2560 bytes)."""
    from megatron.flexsp.planner.prior import ModelShape, analytic_cost_model, recompute_section

    shape = ModelShape(2, 64, 4, 1000, num_query_groups=2, ffn_hidden_size=256, swiglu=True)
    r = recompute_section(shape, 1e-6, 0.01, ref_len=1000, modules=("core_attn", "mlp"))
    assert r["selective"]["activation_mb_per_token"] == pytest.approx((2 * (2560 - 128 - 1536) + 4000) / 2**20)
    assert r["full"]["activation_mb_per_token"] == pytest.approx((2 * 128 + 2560 + 4000) / 2**20)
    per_tok = 3 * (1e-6 * 1000 + 0.01)
    assert r["full"]["compute_factor"] == pytest.approx(1 + (1e-3 + 0.01 * 122880 / 186880) / per_tok)
    assert r["selective"]["compute_factor"] == pytest.approx(1 + (1e-3 + 0.01 * 98304 / 186880) / per_tok)
    assert r["full"]["alltoall_factor"] == r["selective"]["alltoall_factor"] == 1.5
    only_attn = recompute_section(shape, 1e-6, 0.01, ref_len=1000, modules=("core_attn",))["selective"]
    assert only_attn["activation_mb_per_token"] == pytest.approx((2 * (2560 - 128) + 4000) / 2**20)
    prior = analytic_cost_model(
        shape, device_flops=1e12, intra_node_gbs=100, inter_node_gbs=10, limit_gb=40, gpus_per_node=8, world_size=8
    )
    assert prior.modes == ("none", "selective", "full")  # the prior carries the modes (Megatron's core_attn)
    assert prior.recompute["selective"].activation_mb_per_token < prior.memory.activation_mb_per_token
