"""The trainer with --recompute-granularity auto on 4 gloo ranks: the planner picks modes per group, the runtime applies them.

Memory binds (a cost model whose limit holds 900 tokens per rank without recomputation and 4.5x
more with full recomputation), so the planner puts long sequences on fewer ranks with full
recomputation while other groups run without it (mixing within a micro-batch: test_recompute). Reference: the same
batches trained without recomputation (other plans: larger SP groups instead), whose losses must
be the same to float rounding, since neither plans nor recomputation change the mathematics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron.flexsp.launching import run_bounded, torchrun_command

ROOT = Path(__file__).resolve().parents[2]


def _cost_model(path: Path) -> None:
    from megatron.flexsp.planner.costmodel import build_cost_model

    act = 0.0125  # MB per token of this model (2 layers, hidden 64), as flexsp-profile measures it
    cost = build_cost_model(
        name="memory-bound",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=4,
        gpus_per_node=4,
        alpha1_ms_per_token2=1e-4,
        alpha2_ms_per_token=0.2,
        beta1_ms=5.0,
        bandwidth_gbs={2: 0.005, 4: 0.002},  # a slow link: a long sequence is cheaper recomputed on one rank
        limit_gb=(0.5 + act * 900) / 1024,
        model_states_mb=0.5,
        activation_mb_per_token=act,
    )
    d = cost.to_dict()
    d["recompute"] = {
        "selective": {"activation_mb_per_token": act, "compute_factor": 1.05, "alltoall_factor": 1.375},
        "full": {"activation_mb_per_token": act / 4.5, "compute_factor": 1.35, "alltoall_factor": 1.5},
    }
    path.write_text(json.dumps(d))


def _train(tmp: Path, name: str, *flags: str) -> tuple[list[float], list[str]]:
    plans, metrics = tmp / f"plans-{name}", tmp / f"metrics-{name}.jsonl"
    cmd = [
        *torchrun_command(4),
        "pretrain_gpt_flexsp.py",
        *("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 1024 --global-batch-size 16").split(),
        *("--train-iters 3 --mock-data --mock-data-median 300 --no-progress-bar --flexsp-plan-ahead 0").split(),
        "--flexsp-calibrate",
        "off",
        "--flexsp-cost-model",
        str(tmp / "cost.json"),
        "--flexsp-dump-plans",
        str(plans),
        "--metrics-file",
        str(metrics),
        *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = run_bounded(cmd, 300, capture=True, cwd=ROOT, env=env)
    assert not r.timed_out and r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    modes = [
        g.get("recompute", "none")
        for p in sorted(plans.glob("*.json"))
        for mb in json.loads(p.read_text())["micro_batches"]
        for g in mb["groups"]
    ]
    return losses, modes


@pytest.mark.slow  # two 4-rank training runs
def test_trainer_auto_recompute_mixes_modes_and_keeps_the_losses(tmp_path):
    _cost_model(tmp_path / "cost.json")
    auto_losses, auto_modes = _train(tmp_path, "auto", "--recompute-granularity", "auto")
    none_losses, none_modes = _train(tmp_path, "none")
    assert "full" in auto_modes and "none" in auto_modes, auto_modes  # per group, within the same run
    assert set(none_modes) == {"none"}
    assert len(auto_losses) == len(none_losses) == 3
    for a, b in zip(auto_losses, none_losses):
        assert a == pytest.approx(b, rel=1e-5), (auto_losses, none_losses)
