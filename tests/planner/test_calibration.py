"""Fitting, online calibration and the analytic prior (planner/fitting.py, calibration.py, prior.py).

Calibration is checked against the coefficients that generated synthetic measurements (with 20 %
multiplicative noise and a few gross outliers), starting from a model that is far off; the prior
against a hand computation of its formulas for a small shape.
"""

import json
import math

import numpy as np
import pytest

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.calibration import (
    CalibrationConfig,
    CostCalibrator,
    GroupSample,
)
from megatron.flexsp.planner.costmodel import CostModel, alltoall_bytes_per_token
from megatron.flexsp.planner.fitting import (
    FitError,
    fit_bandwidth,
    fit_compute,
    fit_linear,
    robust_nonneg_fit,
)
from megatron.flexsp.planner.presets import preset
from megatron.flexsp.planner.prior import (
    ModelShape,
    analytic_cost_model,
    num_parameters,
)


def test_profiler_fitters_moved_unchanged():
    lens = [[s] for s in (64, 128, 256, 512, 1024, 2048)] + [[s] * (2048 // s) for s in (64, 256)]
    fit = fit_compute([(ls, sum(5.1e-6 * s * s + 0.18 * s for s in ls) + 630.0) for ls in lens])
    assert fit.alpha1_ms_per_token2 == pytest.approx(5.1e-6, rel=1e-6)
    assert fit.beta1_ms == pytest.approx(630.0, rel=1e-6) and fit.samples == len(lens)
    assert fit_bandwidth([(mb, mb / 96.5) for mb in (8.0, 64.0)]) == pytest.approx(96.5)
    assert fit_linear([1, 2, 4], [3, 5, 9]).slope == pytest.approx(2.0)
    with pytest.raises(FitError, match="at least 3"):
        fit_compute([([64], 1.0)])
    with pytest.raises(FitError):
        fit_linear([1, 1], [1, 2])


def test_robust_fit_ignores_gross_outliers():
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(1, 100, 200), np.ones(200)], axis=1)
    y = x @ np.array([2.0, 30.0]) * (1 + 0.02 * rng.standard_normal(200))
    y[:10] *= 4.0  # measured while something else ran
    fit = robust_nonneg_fit(x, y)
    assert fit.coef == pytest.approx([2.0, 30.0], rel=0.02)
    assert fit.outliers >= 10


def _truth() -> CostModel:
    return preset("cpu-tiny-ddp")


def _samples(truth: CostModel, n: int, noise: float, seed: int) -> list[GroupSample]:
    """Groups as the executor would see them: degree 1/2/4, 1-8 long-tail sequences of up to 2048 tokens."""
    rng = np.random.default_rng(seed)
    pool = longtail_lengths(8 * n, max_len=2048, median=200, tail_min=512, min_len=16, seed=seed)
    out = []
    for i in range(n):
        d = int(rng.choice([1, 2, 4]))
        lens = pool[8 * i : 8 * i + int(rng.integers(1, 9))]
        T, sq = int(lens.sum()), float((lens.astype(np.float64) ** 2).sum())
        comp = truth.compute_ms(lens.tolist(), d) * (1 + noise * rng.standard_normal())
        a2a = truth.alltoall_ms(T, d) * (1 + noise * rng.standard_normal()) if d > 1 else 0.0
        out.append(GroupSample(d, T, sq, max(comp, 1e-3), max(a2a, 0.0)))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_calibration_recovers_coefficients_with_20pct_noise(seed):
    truth = _truth()
    c = truth.compute
    # start far off: compute x0.3, bandwidth x3 (the calibration target)
    d0 = truth.to_dict()
    d0["compute"] = {k: v * 0.3 for k, v in d0["compute"].items()}
    d0["alltoall"]["bandwidth_gbs"] = {k: v * 3 for k, v in d0["alltoall"]["bandwidth_gbs"].items()}
    start = CostModel.from_dict(d0)
    cal = CostCalibrator(start, CalibrationConfig(window=2000))
    cal.extend(_samples(truth, 2000, 0.20, seed))
    # a few gross outliers (a busy machine) must not move the fit
    cal.extend(GroupSample(1, 1000, 1e6, 50 * truth.compute_ms([1000], 1)) for _ in range(20))
    got = cal.refit()
    assert got.compute.alpha1_ms_per_token2 == pytest.approx(c.alpha1_ms_per_token2, rel=0.05)
    assert got.compute.alpha2_ms_per_token == pytest.approx(c.alpha2_ms_per_token, rel=0.05)
    assert got.compute.beta1_ms == pytest.approx(c.beta1_ms, rel=0.05)
    for d, bw in truth.alltoall.bandwidth_gbs.items():
        assert got.bandwidth(d) == pytest.approx(bw, rel=0.05)
    assert cal.report["compute"]["applied"] and cal.current is got


def test_calibration_waits_for_enough_samples_and_window_follows_drift():
    truth = _truth()
    cal = CostCalibrator(truth, CalibrationConfig(window=200, min_samples=24, min_degree_samples=6))
    cal.extend(_samples(truth, 10, 0.0, 1))
    m = cal.refit()
    assert m.compute == truth.compute  # too few samples: unchanged
    # the machine got 2x slower: after a full window of new samples the fit follows
    d = truth.to_dict()
    d["compute"] = {k: 2 * v for k, v in d["compute"].items()}
    slow = CostModel.from_dict(d)
    cal.extend(_samples(slow, 200, 0.05, 2))
    m = cal.refit()
    assert m.compute.alpha2_ms_per_token == pytest.approx(2 * truth.compute.alpha2_ms_per_token, rel=0.1)
    assert m.compute.beta1_ms == pytest.approx(2 * truth.compute.beta1_ms, rel=0.1)
    assert cal.num_samples == 200


def test_memory_only_grows():
    base = _truth()
    act = base.memory.activation_mb_per_token
    cal = CostCalibrator(base)
    tpg = base.tokens_per_gpu
    ms = base.memory.model_states_mb
    cal.add(2, 2 * tpg, 2.0 * tpg * tpg, 100.0, 5.0, peak_mb=ms + 0.5 * act * tpg, tokens_per_rank=tpg)  # below
    assert cal.refit().memory.activation_mb_per_token == act
    cal.add(2, tpg, 1.0 * tpg * tpg, 100.0, 5.0, peak_mb=ms + 1.3 * act * tpg / 2)  # above
    assert cal.refit().memory.activation_mb_per_token == pytest.approx(1.3 * act)
    cal.add(2, 4, 8.0, 10.0, 1.0, peak_mb=ms + 500.0)  # 2 tokens per rank: workspace, not per-token memory
    cal.add(2, tpg, 1.0 * tpg * tpg, 100.0, 5.0, peak_mb=ms + 0.1 * act * tpg / 2)
    m = cal.refit()
    assert m.memory.activation_mb_per_token == pytest.approx(1.3 * act)
    assert m.memory.limit_gb == base.memory.limit_gb and m.tokens_per_gpu < base.tokens_per_gpu


def test_state_round_trip_gives_identical_models():
    truth = _truth()
    samples = _samples(truth, 300, 0.2, 5)
    a = CostCalibrator(truth, CalibrationConfig(window=150))
    a.extend(samples[:200])
    a.refit()
    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as in a checkpoint
    b = CostCalibrator.from_state_dict(state)
    assert b.current.to_dict() == a.current.to_dict()
    a.extend(samples[200:])
    b.extend(samples[200:])
    assert a.refit().to_dict() == b.refit().to_dict()
    # the calibrated model is an ordinary cost-model JSON
    assert CostModel.from_dict(json.loads(json.dumps(a.current.to_dict()))).to_dict() == a.current.to_dict()
    # bad samples are counted, not fitted
    a.add(1, 0, 0.0, 5.0)
    a.add(1, 10, 100.0, float("nan"))
    assert a.state_dict()["rejected"] == 2


def test_analytic_prior_matches_hand_computation():
    shape = ModelShape(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=1000,
        num_query_groups=2,
        ffn_hidden_size=256,
        swiglu=True,
    )
    # parameters by hand: qkv 64*(64+2*64*2/4)=64*128=8192, out 4096, mlp 3*64*256=49152, norms 128
    per_layer = 8192 + 4096 + 49152
    P = 2 * (per_layer + 128) + 2 * 1000 * 64 + 64
    assert num_parameters(shape) == P
    machine = dict(
        device_flops=2e11, intra_node_gbs=10.0, inter_node_gbs=1.0, limit_gb=2.0, gpus_per_node=2, world_size=4
    )
    m = analytic_cost_model(shape, **machine, efficiency=0.5, sharding="zero3")
    fpm = 2e11 * 0.5 / 1000
    assert m.compute.alpha2_ms_per_token == pytest.approx(6 * (2 * per_layer + 64000) / fpm)
    assert m.compute.alpha1_ms_per_token2 == pytest.approx(12 * 64 * 2 * 0.5 / fpm)
    assert m.compute.beta1_ms == pytest.approx(3 * P * 2 * 3 / 4 / 1e9 * 1000)  # inter-node link, 1 GB/s
    assert m.alltoall.bytes_per_token == alltoall_bytes_per_token(2, 64, 4, 2, 2) == 2 * 2 * (128 + 64) * 2
    unit = 1e9 / 1000 / 2**20
    assert m.bandwidth(2) == pytest.approx(10 * unit * 2)  # d/(d-1) = 2
    assert m.bandwidth(4) == pytest.approx(1 * unit * 4 / 2)  # d/(d-g) = 2
    assert set(m.alltoall.bandwidth_gbs) == {2, 4}
    assert m.memory.model_states_mb == pytest.approx(16 * P / 4 / 2**20)
    act = 2 * 2 * (7 * 64 + 2 * 64 * 2 / 4 + 3 * 256) + 4 * 1000
    assert m.memory.activation_mb_per_token == pytest.approx(act / 2**20)
    assert m.allowed_degrees(4) == [1, 2, 4]
    ddp = analytic_cost_model(shape, **machine, sharding="ddp", overhead_ms=3.0)
    assert ddp.compute.beta1_ms == 3.0 and ddp.memory.model_states_mb == pytest.approx(16 * P / 2**20)
    assert math.isclose(ddp.compute.alpha2_ms_per_token, 0.5 * m.compute.alpha2_ms_per_token)


def test_prior_is_the_right_order_for_the_paper_7b():
    # Llama-7B-like shape on A100 (312 TFLOP/s bf16 peak, ~45 % achieved): within 2x of the paper's fit
    shape = ModelShape(
        num_layers=32, hidden_size=4096, num_attention_heads=32, vocab_size=32000, ffn_hidden_size=11008, swiglu=True
    )
    m = analytic_cost_model(
        shape,
        device_flops=312e12,
        efficiency=0.45,
        intra_node_gbs=150.0,
        inter_node_gbs=12.5,
        limit_gb=30.0,
        gpus_per_node=8,
        world_size=64,
    )
    paper = preset("gpt-7b", 64)
    assert 0.5 < m.compute.alpha2_ms_per_token / paper.compute.alpha2_ms_per_token < 2.0
    assert 0.5 < m.memory.activation_mb_per_token / paper.memory.activation_mb_per_token < 2.0


def test_samples_from_an_executed_plan():
    from megatron.flexsp.planner.calibration import coefficients, samples_from_plan
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan, PlanError

    plan = Plan(
        4,
        [300, 100, 50, 700],
        [
            MicroBatch([Group([0, 1], [0, 1]), Group([2], [2]), Group([3], [])]),
            MicroBatch([Group([0, 1, 2, 3], [3])]),
        ],
    )
    meas = [
        [{"compute_ms": 10.0, "a2a_ms": 2.0, "peak_mb": 900.0}, {"compute_ms": 4.0}, None],
        [{"compute_ms": 30.0, "a2a_ms": 9.0, "a2a_bytes": 1e6}],
    ]
    got = samples_from_plan(plan, meas)
    assert got == [
        GroupSample(2, 400, 100000.0, 10.0, 2.0, 0.0, 900.0, 200.0),
        GroupSample(1, 50, 2500.0, 4.0, 0.0, 0.0, None, 50.0),
        GroupSample(4, 700, 490000.0, 30.0, 9.0, 1e6, None, 175.0),
    ]
    with pytest.raises(PlanError):
        samples_from_plan(plan, meas[:1])
    co = coefficients(preset("cpu-tiny-ddp"))
    assert co["beta1_ms"] == 16.2 and co["bandwidth_gbs_4"] == 0.019 and json.dumps(co)
