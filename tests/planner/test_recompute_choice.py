"""The planner's recompute choice (PlannerConfig.recompute): fixed modes, auto per group, against brute force
and against every fixed mode solved by the same solver; memory per mode; "none" unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron.flexsp.planner.api import PlannerConfig, plan_global_batch
from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.planner.micro.context import PlannerContext
from megatron.flexsp.planner.micro.exact import exact_micro_batch
from megatron.flexsp.planner.mode_choice import planning_modes
from megatron.flexsp.planner.placement import can_place
from megatron.flexsp.planner.plan import validate_plan
from tests.planner._p1_util import degree_multisets, tiny_cost

RECOMPUTE = {
    "selective": {"activation_mb_per_token": 0.55, "compute_factor": 1.08, "alltoall_factor": 1.0},
    "full": {"activation_mb_per_token": 0.15, "compute_factor": 1.33, "alltoall_factor": 1.5},
}
MODES = ("none", "selective", "full")


def rc_cost(**kw) -> CostModel:
    d = tiny_cost(**kw).to_dict()
    d["recompute"] = {m: dict(v) for m, v in RECOMPUTE.items()}
    return CostModel.from_dict(d)


def brute_micro_batch(lengths, cost: CostModel, ws: int, modes) -> float:
    """Optimal time of one micro-batch: every placeable structure, assignment, and per group every mode."""
    best = float("inf")
    n = len(lengths)
    for degs in degree_multisets(cost.allowed_degrees(ws), ws):
        if not can_place(degs, cost, ws):
            continue
        G = len(degs)
        for assign in itertools.product(range(G), repeat=n):
            members = [[lengths[s] for s in range(n) if assign[s] == g] for g in range(G)]
            if n >= G and any(not m for m in members):
                continue
            t = 0.0
            for m, d in zip(members, degs):
                if m:
                    fit = [cost.group_time_ms(m, d, md) for md in modes if cost.fits(sum(m), d, md)]
                    t = max(t, min(fit, default=float("inf")))
            best = min(best, t)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_exact_auto_is_the_brute_force_optimum_and_no_fixed_mode_beats_it(seed):
    rng = np.random.default_rng(seed)
    cost, ws = rc_cost(), 4
    L = rng.integers(200, 5000, size=int(rng.integers(2, 5)))
    ctx = PlannerContext.build(cost, ws, MODES)
    sol = exact_micro_batch(ctx, L, ctx.tau_table(L))
    opt = brute_micro_batch(L.tolist(), cost, ws, MODES)
    assert sol is not None and sol.extra["exact_proven"]
    assert sol.time_ms == pytest.approx(opt, rel=1e-9)
    for m in MODES:  # the same solver with one mode
        one = PlannerContext.build(cost, ws, (m,))
        fixed = exact_micro_batch(one, L, one.tau_table(L))
        ref = brute_micro_batch(L.tolist(), cost, ws, (m,))
        if fixed is None:
            assert ref == float("inf")
            continue
        assert fixed.time_ms == pytest.approx(ref, rel=1e-9)
        assert sol.time_ms <= fixed.time_ms + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_auto_plans_never_worse_than_the_best_fixed_mode(seed):
    rng = np.random.default_rng(100 + seed)
    cost, ws = rc_cost(), 4
    L = rng.integers(50, 6000, size=int(rng.integers(3, 12))).tolist()
    plans = {}
    for m in MODES + ("auto",):
        try:
            plans[m] = plan_global_batch(L, cost, PlannerConfig(world_size=ws, recompute=m, work_limit=400))
        except Exception as e:  # a fixed mode that cannot hold a sequence
            assert m != "auto" and "no feasible plan" in str(e)
            continue
        validate_plan(plans[m], cost, world_size=ws, num_sequences=len(L))
    best_fixed = min(p.estimated_time_ms for m, p in plans.items() if m != "auto")
    assert plans["auto"].estimated_time_ms <= best_fixed * (1 + 1e-9)


def test_memory_per_mode_respected_and_auto_labels_the_fastest_fitting_mode():
    rng = np.random.default_rng(7)
    cost, ws = rc_cost(gpus_per_node=4), 8
    L = rng.integers(100, 7900, size=24).tolist()
    for m in MODES + ("auto",):
        p = plan_global_batch(L, cost, PlannerConfig(world_size=ws, recompute=m, time_limit_s=0.5))
        for mb in p.micro_batches:
            for g in mb.groups:
                if not g.sequences:
                    continue
                lens = [L[s] for s in g.sequences]
                assert cost.memory_mb(sum(lens), g.degree, g.recompute) <= cost.limit_mb + 1e-6
                if m == "auto":
                    assert g.recompute == cost.best_mode(lens, g.degree)
                else:
                    assert g.recompute == m


def test_memory_bound_batch_auto_mixes_modes():
    """One long sequence that only full recompute holds on 4 ranks, many short ones: auto runs the long one
    with full recomputation and the short ones with less or none, faster than full everywhere."""
    cost, ws = rc_cost(), 4
    L = [15000] + [400] * 12
    with pytest.raises(Exception, match="no feasible plan"):
        plan_global_batch(L, cost, PlannerConfig(world_size=ws, recompute="none", work_limit=200))
    full = plan_global_batch(L, cost, PlannerConfig(world_size=ws, recompute="full", work_limit=200))
    auto = plan_global_batch(L, cost, PlannerConfig(world_size=ws, recompute="auto", work_limit=200))
    modes = {g.recompute for mb in auto.micro_batches for g in mb.groups if g.sequences}
    assert "full" in modes and len(modes) > 1
    assert auto.estimated_time_ms < full.estimated_time_ms


def test_none_with_recompute_fields_plans_exactly_as_without():
    rng = np.random.default_rng(3)
    L = rng.integers(50, 3900, size=20).tolist()
    cfg = PlannerConfig(world_size=8, work_limit=300)
    a = plan_global_batch(L, rc_cost(), cfg).to_dict()
    b = plan_global_batch(L, tiny_cost(), cfg).to_dict()
    for d in (a, b):
        d["solver"].pop("solve_time_s")
        d["solver"].pop("phase_s", None)
        d["solver"].pop("constructive_s", None)
    assert a == b


def test_choice_validation_and_dominated_modes():
    with pytest.raises(ValueError, match="recompute must be one of none, selective, full, auto"):
        PlannerConfig(world_size=4, recompute="partial")
    with pytest.raises(CostModelError, match="needs the cost model's 'recompute.full'"):
        planning_modes(tiny_cost(), "full")
    assert planning_modes(tiny_cost(), "auto") == ("none",)
    assert planning_modes(rc_cost(), "auto") == MODES
    d = rc_cost().to_dict()
    d["recompute"]["selective"] = {"activation_mb_per_token": 0.2, "compute_factor": 1.4, "alltoall_factor": 1.5}
    assert planning_modes(CostModel.from_dict(d), "auto") == (
        "none",
        "full",
    )  # selective: slower and hungrier than full


def test_explain_adds_up_with_recompute_modes():
    from megatron.flexsp.planner.explain import breakdown

    cost, ws = rc_cost(), 4
    p = plan_global_batch([15000] + [400] * 12, cost, PlannerConfig(world_size=ws, recompute="auto", work_limit=200))
    b = breakdown(p, cost)
    parts = b.unavoidable_ms + b.degree_ms + b.extra_micro_batches_ms + b.memory_packing_ms + b.imbalance_ms
    assert b.total_ms == pytest.approx(p.estimated_time_ms, rel=1e-9)
    assert parts == pytest.approx(b.total_ms, rel=1e-9)
    assert min(b.degree_ms, b.memory_packing_ms, b.imbalance_ms) >= -1e-6


@pytest.mark.parametrize("seed", range(4))
def test_milp_with_mode_options_gives_consistent_groups(seed):
    """The MILP sees every (degree, mode) option: its groups fit their option's memory, its time is what the
    options' taus say, and it is no better than the brute-force optimum over modes."""
    from megatron.flexsp.planner.micro.milp import milp_micro_batch

    rng = np.random.default_rng(200 + seed)
    cost, ws = rc_cost(), 4
    L = rng.integers(200, 5000, size=4)
    ctx = PlannerContext.build(cost, ws, MODES)
    tau = ctx.tau_table(L)
    sol = milp_micro_batch(ctx, L, tau, None, 50, time_limit_s=2.0, milp_span=None)
    assert sol is not None and sol.options is not None
    assert sorted(i for m in sol.members for i in m) == list(range(L.size))
    t = 0.0
    for k, mem in zip(sol.options, sol.members):
        if mem:
            assert L[mem].sum() <= ctx.caps[k]
            t = max(t, ctx.beta1 + tau[mem, k].sum())
    assert sol.time_ms == pytest.approx(t, rel=1e-9)
    assert sol.time_ms >= brute_micro_batch(L.tolist(), cost, ws, MODES) - 1e-9


def test_flexsp_plan_cli_recompute(tmp_path, capsys):
    from megatron.flexsp.planner.cli import main
    from megatron.flexsp.planner.plan import Plan

    cost_file = tmp_path / "cost.json"
    rc_cost().save(cost_file)
    out = tmp_path / "out"
    args = ["--synthetic", "300", "--max-seq-len", "15000", "--iters", "1", "--world-size", "4"]
    args += ["--global-batch-size", "10", "--time-limit", "0.3", "--quiet", "--cost-model", str(cost_file)]
    assert main([*args, "--methods", "flexsp", "--recompute", "auto", "--output", str(out), "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "recompute auto, groups per mode: flexsp" in printed
    plan = Plan.load(out / "plans" / "flexsp" / "iter_0000.json")
    validate_plan(plan, rc_cost())
    for mb in plan.micro_batches:
        for g in mb.groups:
            if g.sequences:
                assert g.recompute == rc_cost().best_mode([plan.lengths[s] for s in g.sequences], g.degree)
    assert (out / "plots" / "flexsp_iter_0000.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as e:  # a mode the cost model lacks: one line, exit 2, before planning
        main(["--synthetic", "30", "--cost-model", "cpu-tiny", "--recompute", "full", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "recompute 'full' needs the cost model's 'recompute.full' coefficients" in err
