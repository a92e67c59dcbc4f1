"""The trainer's recompute choice reaches the planner: --recompute-granularity -> PlannerConfig.recompute, and a
cost model without the modes the run asks for gets them from the analytic prior of the model's shape."""

from __future__ import annotations

import argparse

import pytest

from megatron.flexsp.planner.presets import preset
from megatron.flexsp.planner.prior import ModelShape, _activation_mb, recompute_section
from megatron.flexsp.training.config_types import FlexSPConfig
from megatron.flexsp.training.cost_setup import with_run_recompute
from megatron.flexsp.training.planner_worker import plan_inline


@pytest.mark.parametrize("flag, want", [(None, "none"), ("full", "full"), ("selective", "selective"), ("auto", "auto")])
def test_granularity_flag_reaches_planner_config(flag, want):
    cfg = FlexSPConfig(seq_length=2048, recompute_granularity=flag)
    assert cfg.planner_config(4).recompute == want


def _args(granularity, modules=None):
    return argparse.Namespace(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=None,
        swiglu=True,
        bf16=False,
        recompute_granularity=granularity,
        recompute_modules=modules,
    )


def test_missing_modes_derived_from_the_shape_at_the_cost_models_level():
    cost = preset("cpu-tiny")
    same, note = with_run_recompute(cost, _args(None), vocab_size=1000)
    assert same is cost and note == ""
    out, note = with_run_recompute(cost, _args("auto", ["core_attn", "mlp"]), vocab_size=1000)
    assert out.modes == ("none", "selective", "full") and "derived from the model shape" in note
    shape = ModelShape(2, 64, 4, 1000, 2, swiglu=True)
    raw = recompute_section(
        shape, cost.compute.alpha1_ms_per_token2, cost.compute.alpha2_ms_per_token, e=4, modules=("core_attn", "mlp")
    )
    none_raw = _activation_mb(shape, 4)
    for m in ("selective", "full"):  # the shape's ratio to mode none, at the preset's measured level
        ratio = raw[m]["activation_mb_per_token"] / none_raw
        assert out.recompute[m].activation_mb_per_token == pytest.approx(
            ratio * cost.memory.activation_mb_per_token, rel=1e-12
        )
        assert out.recompute[m].compute_factor == pytest.approx(raw[m]["compute_factor"], rel=1e-12)
    only_full, _ = with_run_recompute(cost, _args("full"), vocab_size=1000)
    kept, note = with_run_recompute(only_full, _args("full"), vocab_size=1000)  # present: kept as is
    assert kept is only_full and note == ""


def test_plan_inline_with_auto():
    cost, _ = with_run_recompute(preset("cpu-tiny"), _args("auto", ["core_attn", "mlp"]), vocab_size=1000)
    cfg = FlexSPConfig(seq_length=4096, recompute_granularity="auto", time_limit_s=0.2).planner_config(4)
    plan = plan_inline([3000, 1500, 900, 500, 200, 100], cost, cfg)  # 3000 tokens: over 4 ranks' 2048 without
    assert "selective" in {
        g.recompute for mb in plan.micro_batches for g in mb.groups if 3000 in [plan.lengths[s] for s in g.sequences]
    }
