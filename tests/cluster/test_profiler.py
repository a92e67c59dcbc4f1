"""flexsp-profile: the least-squares fits recover known coefficients; the profiler runs end to end
on gloo ranks and writes a cost model the planner accepts, with memory numbers that agree with
an independent count of the model's parameters."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.flexsp.launching import run_bounded, torchrun_command
from megatron.flexsp.planner.costmodel import CostModel, alltoall_bytes_per_token
from megatron.flexsp.planner.fitting import fit_bandwidth, fit_compute, fit_linear
from megatron.flexsp.training.profiler import (
    GPU_MEMORY_PROBE_CAP,
    ProfileConfig,
    ProfileError,
    memory_probe_lengths,
    profile_config_from_args,
)
from tests.torchrun_utils import as_flags, tiny_gpt

ROOT = Path(__file__).resolve().parents[2]


def _synthetic(a1, a2, b1, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [[s] for s in (64, 128, 256, 512, 1024, 2048)] + [[s] * (2048 // s) for s in (64, 128, 256, 512)]
    out = []
    for ls in shapes:
        ms = sum(a1 * s * s + a2 * s for s in ls) + b1
        out.append((ls, ms * (1 + noise * rng.standard_normal())))
    return out


@pytest.mark.parametrize("seq_length", [2048, 8192, 65536, 131072])
def test_memory_probe_has_a_slope_at_every_length(seq_length):
    """The memory probe must give fit_linear two or more distinct lengths, also where FlexSP matters most."""
    for cuda in (False, True):
        lengths = memory_probe_lengths(seq_length, cuda)
        assert len(set(lengths)) >= 2, (seq_length, cuda, lengths)
        assert lengths == sorted(lengths) and max(lengths) <= seq_length
        if cuda:
            assert max(lengths) == min(seq_length, GPU_MEMORY_PROBE_CAP)
    assert memory_probe_lengths(65536, True) == memory_probe_lengths(8192, True)
    fit_linear(memory_probe_lengths(131072, True), [3.0 * s + 7 for s in memory_probe_lengths(131072, True)])


def test_fit_compute_recovers_exact_coefficients():
    fit = fit_compute(_synthetic(5.1e-6, 0.18, 630.0))
    assert fit.alpha1_ms_per_token2 == pytest.approx(5.1e-6, rel=1e-6)
    assert fit.alpha2_ms_per_token == pytest.approx(0.18, rel=1e-6)
    assert fit.beta1_ms == pytest.approx(630.0, rel=1e-6)
    assert fit.rms_rel_err < 1e-9 and fit.samples == 10


def test_fit_compute_with_noise_and_small_coefficients():
    # CPU-like magnitudes, 1% multiplicative noise: coefficients within a few percent, error reported
    fit = fit_compute(_synthetic(2e-5, 0.05, 5.0, noise=0.01, seed=3))
    assert fit.alpha1_ms_per_token2 == pytest.approx(2e-5, rel=0.05)
    assert fit.alpha2_ms_per_token == pytest.approx(0.05, rel=0.1)
    assert fit.beta1_ms == pytest.approx(5.0, rel=0.25)
    assert 0.002 < fit.rms_rel_err < 0.03
    # a constant-dominated machine: alpha1 may be 0 but never negative
    fit0 = fit_compute([([s], 70.0 + 0.01 * s) for s in (32, 64, 128, 256)])
    assert fit0.alpha1_ms_per_token2 == pytest.approx(0.0, abs=1e-12)
    assert fit0.alpha2_ms_per_token == pytest.approx(0.01, rel=1e-6)


def test_fit_compute_rejects_unusable_samples():
    with pytest.raises(ProfileError, match="at least 3"):
        fit_compute([([64], 1.0), ([128], 2.0)])
    with pytest.raises(ProfileError, match="three different lengths"):
        fit_compute([([64], 1.0), ([64], 1.1), ([64], 0.9)])
    with pytest.raises(ProfileError, match="positive"):
        fit_compute([([64], 1.0), ([128], -2.0), ([256], 3.0)])


def test_fit_bandwidth_and_linear():
    bw = 96.5
    samples = [(mb, mb / bw) for mb in (8.0, 16.0, 64.0)]
    assert fit_bandwidth(samples) == pytest.approx(bw, rel=1e-12)
    # a fixed latency lowers the effective bandwidth, weighted toward the large messages
    lat = [(mb, mb / bw + 0.05) for mb in (8.0, 16.0, 64.0)]
    assert 80 < fit_bandwidth(lat) < bw
    lin = fit_linear([100, 200, 400], [1.5 + 0.02 * x for x in (100, 200, 400)])
    assert lin.slope == pytest.approx(0.02) and lin.intercept == pytest.approx(1.5)
    with pytest.raises(ProfileError):
        fit_linear([100, 100], [1.0, 2.0])
    with pytest.raises(ProfileError):
        fit_bandwidth([])


def test_config_errors_name_the_flag():
    with pytest.raises(ProfileError, match="--memory-limit-gb or --capacity-tokens"):
        ProfileConfig(memory_limit_gb=1.0, capacity_tokens=10).validate()
    with pytest.raises(ProfileError, match="--profile-lengths"):
        ProfileConfig(lengths=[0, 5]).validate()
    # the trainer's namespace (no profiler flags) gives the defaults; --flexsp-profile names the output
    import argparse

    cfg = profile_config_from_args(argparse.Namespace(seq_length=512, flexsp_profile="x.json"))
    assert (cfg.output, cfg.max_len, cfg.repeats) == ("x.json", 512, 5)


def _run_bounded(cmd, timeout, **kw):
    """Run to the end; a timeout stops the whole tree (torchrun and its workers) and fails the test."""
    r = run_bounded(cmd, timeout, capture=True, **kw)
    if r.timed_out:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


def _param_count(layers, h, heads, groups, ffn, vocab, tied=True):
    dh = h // heads
    attn = h * (heads + 2 * groups) * dh + heads * dh * h
    mlp = h * 2 * ffn + ffn * h  # SwiGLU: fc1 holds gate and up
    norms = 2 * h
    # embedding, output layer (unless tied to the embedding, the default), final norm
    return layers * (attn + mlp + norms) + (1 if tied else 2) * vocab * h + h


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_profiler_end_to_end_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "cost.json"
    model = tiny_gpt(32, 256, ffn_hidden_size=64)
    cmd = [
        *torchrun_command(2),
        "-m",
        "megatron.flexsp.training.profiler",
        *model,
        "--capacity-tokens",
        "200",
        *as_flags(profile_repeats=1, profile_warmup=1, profile_a2a_repeats=1),
        "--output",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = _run_bounded(cmd, 240, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "fit error rms" in r.stdout and "wrote" in r.stdout
    d = json.loads(out.read_text())
    cost = CostModel.from_dict(d)
    assert cost.num_layers == 2 and cost.hidden_size == 32 and cost.num_query_groups == 2
    assert cost.gpus_per_node == 2 and sorted(cost.alltoall.bandwidth_gbs) == [2]
    assert cost.alltoall.bytes_per_token == alltoall_bytes_per_token(2, 32, 4, 2, 4)  # fp32 on CPU
    assert cost.allowed_degrees(2) == [1, 2]
    assert cost.tokens_per_gpu == 200  # --capacity-tokens sets the limit exactly
    assert cost.compute.beta1_ms + cost.compute.alpha2_ms_per_token > 0
    # memory: model states >= this rank's share of params + grads + Adam moments (fp32: 16 bytes/param)
    n = _param_count(2, 32, 4, 2, 64, 384)  # the byte vocabulary's 258 ids in a table padded to 384 rows
    measured = d["profile"]["memory"]["measured_states_mb"]
    assert measured == pytest.approx(n * 16 / 2 / 2**20, rel=0.1)
    # activation: at least the fp32 hidden states a layer saves per token, below a generous bound
    act = cost.memory.activation_mb_per_token * 2**20
    assert 2 * 32 * 4 < act < 2 * 400 * 32 * 4 + 384 * 4 * 8, act
    samples = d["profile"]["compute_samples"]
    assert len(samples) >= 6 and all(s["ms"] > 0 for s in samples)


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_profiler_bad_flags_exit_cleanly(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "megatron.flexsp.training.profiler",
        "--seq-length",
        "128",
        "--memory-limit-gb",
        "1",
        "--capacity-tokens",
        "5",
        "--output",
        str(tmp_path / "x.json"),
    ]
    r = _run_bounded(cmd, 120, cwd=ROOT)
    assert r.returncode == 2 and "--memory-limit-gb or --capacity-tokens" in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_single_process_profile_has_no_usable_fake_bandwidth(tmp_path):
    out = tmp_path / "one.json"
    cmd = [
        sys.executable,
        "-m",
        "megatron.flexsp.training.profiler",
        *as_flags(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=128),
        "--capacity-tokens",
        "64",
        "--profile-repeats",
        "1",
        "--profile-warmup",
        "0",
        "--output",
        str(out),
    ]
    r = _run_bounded(cmd, 180, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "no all-to-all measured" in r.stdout
    cost = CostModel.from_dict(json.loads(out.read_text()))
    # the placeholder sits on a degree the heads never allow: no plan can use an unmeasured bandwidth
    assert list(cost.alltoall.bandwidth_gbs) == [3]
    assert cost.allowed_degrees(1) == [1] and 3 not in cost.allowed_degrees(8)


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_trainer_flexsp_profile_flag_profiles_instead_of_training(tmp_path):
    """pretrain_gpt_flexsp.py --flexsp-profile FILE writes a cost model and trains nothing."""
    out = tmp_path / "trainer_cost.json"
    metrics = tmp_path / "metrics.jsonl"
    cmd = [
        sys.executable,
        "pretrain_gpt_flexsp.py",
        "--flexsp-profile",
        str(out),
        *as_flags(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=128),
        "--max-position-embeddings",
        "128",
        "--mock-data",
        "--train-iters",
        "5",
        "--metrics-file",
        str(metrics),
    ]
    r = _run_bounded(cmd, 180, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    cost = CostModel.from_dict(json.loads(out.read_text()))
    assert (cost.num_layers, cost.hidden_size, cost.num_attention_heads) == (1, 32, 4)
    assert not metrics.exists()  # profiling only: no training iteration was logged
