"""Online calibration with recompute modes: a mode's compute factor is learned from its groups, its
activations only grow, the bandwidth fit counts a recomputing group's extra all-to-all, state round trips."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.flexsp.planner.calibration import CalibrationConfig, CostCalibrator, GroupSample
from megatron.flexsp.planner.costmodel import CostModel
from tests.planner._p1_util import tiny_cost

PRIOR = {
    "selective": {"activation_mb_per_token": 0.5, "compute_factor": 1.05, "alltoall_factor": 1.0},
    "full": {"activation_mb_per_token": 0.1, "compute_factor": 1.33, "alltoall_factor": 1.5},
}


def model(full_factor: float = 1.33, bw4: float = 0.5) -> CostModel:
    d = tiny_cost().to_dict()
    d["recompute"] = {m: dict(v) for m, v in PRIOR.items()}
    d["recompute"]["full"]["compute_factor"] = full_factor
    d["alltoall"]["bandwidth_gbs"]["4"] = bw4
    return CostModel.from_dict(d)


def measured(truth: CostModel, rng, n: int, mode: str, noise: float = 0.01) -> list[GroupSample]:
    """Groups timed by the true model (its formulas, the mode's factors), with relative noise."""
    out = []
    for _ in range(n):
        d = int(rng.choice([1, 2, 4]))
        lens = rng.integers(100, 3000, size=int(rng.integers(1, 4))).tolist()
        T = sum(lens)
        comp = truth.compute_ms(lens, d, mode) * (1 + noise * rng.standard_normal())
        a2a = truth.alltoall_ms(T, d, mode) * (1 + noise * rng.standard_normal()) if d > 1 else 0.0
        out.append(GroupSample(d, T, float(sum(x * x for x in lens)), comp, a2a, mode=mode))
    return out


def test_full_compute_factor_learned_alphas_from_none_groups():
    rng = np.random.default_rng(0)
    truth, start = model(full_factor=1.5), model(full_factor=1.33)
    cal = CostCalibrator(start, CalibrationConfig(prior_weight=1.0))
    cal.extend(measured(truth, rng, 60, "none") + measured(truth, rng, 60, "full"))
    new = cal.refit()
    assert new.recompute["full"].compute_factor == pytest.approx(1.5, rel=0.02)
    assert new.recompute["selective"].compute_factor == PRIOR["selective"]["compute_factor"]  # no samples
    assert new.compute.alpha2_ms_per_token == pytest.approx(truth.compute.alpha2_ms_per_token, rel=0.05)
    assert new.to_dict()["calibration"]["recompute_applied"] == ["full"]
    for lens, d in (([2000], 1), ([500, 900], 2), ([2900, 100], 4)):
        want = truth.compute_ms(lens, d, "full")
        assert new.compute_ms(lens, d, "full") == pytest.approx(want, rel=0.03)


def test_bandwidth_refit_counts_the_mode_alltoall_factor():
    rng = np.random.default_rng(1)
    truth, start = model(bw4=0.8), model(bw4=0.5)
    cal = CostCalibrator(start, CalibrationConfig(prior_weight=0.0))
    cal.extend([s for s in measured(truth, rng, 200, "full", noise=0.0) if s.degree == 4])
    assert cal.refit().alltoall.bandwidth_gbs[4] == pytest.approx(0.8, rel=1e-6)


def test_mode_activations_only_grow_and_only_their_own():
    start = model()
    cal = CostCalibrator(start)
    # full: 4000 tokens per rank at 0.1 MB/token would be 24 + 400 MB; a peak of 824 MB means 0.2 MB/token
    cal.add_sample(GroupSample(1, 4000, 4000.0**2, 10.0, peak_mb=824.0, tokens_per_rank=4000, mode="full"))
    cal.add_sample(GroupSample(1, 4000, 4000.0**2, 10.0, peak_mb=200.0, tokens_per_rank=4000, mode="full"))
    new = cal.refit()
    assert new.recompute["full"].activation_mb_per_token == pytest.approx(0.2)
    assert new.memory.activation_mb_per_token == start.memory.activation_mb_per_token
    assert new.recompute["selective"].activation_mb_per_token == PRIOR["selective"]["activation_mb_per_token"]


def test_state_round_trip_and_old_states_read_as_none():
    rng = np.random.default_rng(2)
    cal = CostCalibrator(model())
    cal.extend(measured(model(1.4), rng, 30, "full"))
    cal.add_sample(GroupSample(1, 4000, 4000.0**2, 10.0, peak_mb=924.0, tokens_per_rank=4000, mode="full"))
    cal.refit()
    st = cal.state_dict()
    back = CostCalibrator.from_state_dict(st)
    assert back.refit().to_dict() == cal.refit().to_dict()
    old = dict(st, samples=[s[:8] for s in st["samples"]])
    old.pop("activation_mb_per_token_modes")
    assert {s.mode for s in CostCalibrator.from_state_dict(old)._samples} == {"none"}


def test_samples_of_an_unknown_mode_are_not_evidence():
    cal = CostCalibrator(tiny_cost())
    cal.add_sample(GroupSample(1, 100, 100.0**2, 5.0, mode="full"))
    assert cal.num_samples == 0


def test_trainer_samples_carry_the_group_mode():
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.training.online_calibration import SLOTS_PER_RANK, OnlineCalibration

    plan = Plan(2, [300, 200], [MicroBatch([Group([0], [0], "full"), Group([1], [1])])])
    oc = OnlineCalibration(model(), enabled=True, rank=0, world_size=2)
    gathered = [0.0] * (SLOTS_PER_RANK * 2)
    gathered[0], gathered[SLOTS_PER_RANK] = 7.0, 5.0
    s = oc.samples(plan, gathered)
    assert [(x.mode, x.compute_ms, x.tokens) for x in s] == [("full", 7.0, 300), ("none", 5.0, 200)]
