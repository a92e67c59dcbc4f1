"""flexsp-profile's TP all-reduce measure: on 2 gloo ranks it reduces over the right group and its bandwidth
agrees with a plain timed all-reduce; the unit cost model reads what it writes."""

from __future__ import annotations

import statistics
import time

import pytest

from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.presets import preset
from megatron.flexsp.planner.tensor_parallel import allreduce_bandwidth
from megatron.flexsp.training.profile_config import ProfileError
from megatron.flexsp.training.profile_tensor_parallel import (
    allreduce_buffer_bytes,
    tensor_parallel_section,
    unit_ranks,
)
from tests.dist_utils import run_distributed

NBYTES = 4 * 2**20


def _body(rank: int, world: int) -> tuple[dict, float]:
    import torch
    import torch.distributed as dist

    from megatron.flexsp.training.profile_tensor_parallel import measure_allreduce

    r = measure_allreduce(2, NBYTES, gpus_per_node=2, device=torch.device("cpu"), repeats=7, warmup=2)
    buf = torch.ones(NBYTES // 4)  # an independent timing: the plain collective over the whole (2-rank) world
    times = []
    for _ in range(9):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append((time.perf_counter() - t0) * 1e3)
    return r, statistics.median(times[2:])


def test_allreduce_bandwidth_on_two_gloo_ranks():
    (r0, plain0), (r1, _) = run_distributed(_body, 2, timeout=120)
    assert r0 == r1  # every rank reports the slowest rank's time
    assert r0["bytes"] == NBYTES and r0["ms"] > 0
    plain_gbs = 2 * (2 - 1) / 2 * NBYTES / (plain0 / 1e3) / 1e9  # ring bus bandwidth, computed here
    assert r0["allreduce_bandwidth_gbs"] == pytest.approx(NBYTES / (r0["ms"] / 1e3) / 1e9)
    assert plain_gbs / 4 < r0["allreduce_bandwidth_gbs"] < plain_gbs * 4  # a shared 2-core machine: loose


def test_unit_groups_and_buffer_size():
    assert unit_ranks(8, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ProfileError, match="must divide"):
        unit_ranks(8, 4, 2)  # a TP group of 4 would span 2 nodes of 2
    with pytest.raises(ProfileError, match="must divide"):
        unit_ranks(6, 4, 6)
    assert allreduce_buffer_bytes(8192, 8192, 2) == 128 * 2**20
    assert allreduce_buffer_bytes(10, 64, 4) == 2**20  # latency-bound sizes are raised to 1 MiB
    assert allreduce_buffer_bytes(10**6, 8192, 2) == 256 * 2**20


def test_the_unit_cost_model_reads_the_written_section():
    d = preset("gpt-7b", 64).to_dict()
    d["tensor_parallel"] = tensor_parallel_section(4, 123.0)
    assert allreduce_bandwidth(CostModel.from_dict(d), 4) == pytest.approx(123.0 * 1e9 / 1e3 / 2**20)


def test_profiler_refuses_a_tp_size_that_splits_the_node_before_any_work(capsys, monkeypatch):
    from megatron.flexsp.training.profiler import main

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    out = "/nonexistent-dir/x.json"
    assert main(["--seq-length", "128", "--tensor-model-parallel-size", "3", "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensor-model-parallel-size 3 must divide the world size 1" in err[0]
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.mark.slow  # end to end on 2 gloo ranks, ~30 s on 2 cores
def test_flexsp_profile_writes_the_tp_section(tmp_path):
    import json
    import os
    from pathlib import Path

    from megatron.flexsp.launching import run_bounded, torchrun_command
    from megatron.flexsp.planner.tensor_parallel import unit_cost_model
    from tests.torchrun_utils import as_flags, tiny_gpt

    out = tmp_path / "cost.json"
    cmd = [*torchrun_command(2), "-m", "megatron.flexsp.training.profiler", *tiny_gpt(32, 256, ffn_hidden_size=64)]
    cmd += ["--capacity-tokens", "200", "--tensor-model-parallel-size", "2", "--output", str(out)]
    cmd += as_flags(profile_repeats=1, profile_warmup=1, profile_a2a_repeats=2, profile_recompute="off")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = run_bounded(cmd, 240, capture=True, cwd=Path(__file__).resolve().parents[2], env=env)
    assert not r.timed_out and r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "TP 2 all-reduce" in r.stdout
    d = json.loads(out.read_text())
    gbs = d["tensor_parallel"]["allreduce_bandwidth_gbs"]["2"]
    assert gbs > 0
    cost = CostModel.from_dict(d)
    assert cost.num_layers == 2 and cost.num_attention_heads == 4  # the model itself is profiled whole per GPU
    assert allreduce_bandwidth(cost, 2) == pytest.approx(gbs * 1e9 / 1e3 / 2**20)
    assert unit_cost_model(cost, 2).gpus_per_node == 1
