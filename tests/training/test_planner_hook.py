"""Planner hook: background plans equal inline plans, late/failed plans fall back, broadcast agrees."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.flexsp.planner import api
from megatron.flexsp.planner.costmodel import preset
from megatron.flexsp.planner.plan import validate_plan
from megatron.flexsp.training.planner_hook import PlannerHook
from tests.dist_utils import run_distributed

COST = preset("cpu-tiny")
WS = 4


def _batches(n: int, first: dict[int, int] | None = None) -> list[list[int]]:
    rng = np.random.default_rng(0)
    out = [[int(x) for x in rng.integers(8, 1500, size=12)] for _ in range(n)]
    for k, v in (first or {}).items():
        out[k][0] = v
    return out


def _cfg(method: str = "static") -> dict:
    return dict(world_size=WS, method=method, time_limit_s=1.0, max_seq_len=2048, static_degree=None, seed=0)


def test_background_plans_equal_inline_plans(tmp_path):
    batches = _batches(5)
    cfg = _cfg("batch-adaptive")
    with PlannerHook(COST, cfg, lambda k: batches[k], plan_ahead=2, broadcast=False, dump_dir=tmp_path,
                     max_iterations=5) as hook:
        for k in range(5):
            plan, info = hook.get_plan(k)
            want = api.plan_global_batch(batches[k], COST, api.PlannerConfig(**cfg))
            assert info.source == "planner", info
            assert plan.to_dict()["micro_batches"] == want.to_dict()["micro_batches"]
            assert plan.lengths == batches[k]
            assert (tmp_path / f"plan_{k:07d}.json").exists()
        assert hook.counters.planner == 5


def test_late_and_failing_plans_fall_back_and_training_goes_on():
    batches = _batches(4, first={1: 17, 2: 13})
    cfg = _cfg("static")
    hook = PlannerHook(COST, cfg, lambda k: batches[k], plan_ahead=1, broadcast=False, wait_s=0.3,
                       max_iterations=4, planner_fn="tests.training.planner_faults:faulty_plan")
    try:
        sources = []
        for k in range(4):
            plan, info = hook.get_plan(k)
            validate_plan(plan, COST, world_size=WS, num_sequences=12)
            assert plan.lengths == batches[k]
            sources.append(info.source)
            if info.source == "fallback-error":
                assert "injected planner failure" in info.error
        # batch 1 sleeps 3 s (> 0.3 s wait): fallback; batch 2 raises in the planner: fallback
        assert sources[1] == "fallback-late"
        assert sources[2] in ("fallback-error", "fallback-late")  # late too if the worker still sleeps
        assert hook.counters.fallback_late + hook.counters.fallback_error >= 2
    finally:
        hook.close()
    assert hook._proc is None


def test_inline_planner_error_falls_back():
    batches = _batches(2, first={0: 13})
    hook = PlannerHook(COST, _cfg("static"), lambda k: batches[k], plan_ahead=0, broadcast=False,
                       planner_fn="tests.training.planner_faults:faulty_plan")
    plan, info = hook.get_plan(0)
    assert info.source == "fallback-error" and "injected" in info.error
    validate_plan(plan, COST, world_size=WS, num_sequences=12)
    plan, info = hook.get_plan(1)
    assert info.source == "inline"


def test_dead_planner_process_falls_back():
    batches = _batches(3)
    hook = PlannerHook(COST, _cfg("static"), lambda k: batches[k], plan_ahead=1, broadcast=False, wait_s=0.5,
                       max_iterations=3)
    try:
        plan, info = hook.get_plan(0)
        hook._proc.kill()
        hook._proc.join(5)
        for k in (1, 2):
            plan, info = hook.get_plan(k)
            assert plan.lengths == batches[k]
        assert info.source == "fallback-late"
    finally:
        hook.close()


def _bcast_body(rank, world_size, batches):
    hook = PlannerHook(COST, _cfg("static"), (lambda k: batches[k]) if rank == 0 else None, plan_ahead=0,
                       rank=rank)
    return [hook.get_plan(k)[0].to_dict() for k in range(len(batches))]


def test_plans_are_broadcast_from_rank0():
    batches = _batches(3)
    out = run_distributed(_bcast_body, WS, batches, timeout=120)
    want = [api.plan_global_batch(b, COST, api.PlannerConfig(**_cfg("static"))).to_dict() for b in batches]
    for plans in out:
        assert [p["micro_batches"] for p in plans] == [w["micro_batches"] for w in want]
