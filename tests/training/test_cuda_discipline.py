"""No CUDA call before this rank's device is set, and none at all on a gloo run (issue 17, items 1 and 3).

Why a mock: these machines have no GPU, and the defects only show on a GPU node (every rank
opening a context on GPU 0; a gloo run seeding the CUDA RNG tracker). ``torch.cuda`` is replaced
by a recorder that claims 8 GPUs, so the code takes its GPU paths and every call is logged.
"""

from __future__ import annotations

import argparse
import types

import pytest
import torch

from megatron.flexsp.training import cost_setup
from megatron.flexsp.training.distributed import device_for_backend, init_distributed, launch_env

# Calls that create or use a CUDA context (queries like is_available/device_count do not;
# torch.manual_seed's own lazy torch.cuda.manual_seed_all queues a seed and opens nothing).
_CONTEXT_CALLS = {
    "set_device",
    "current_device",
    "synchronize",
    "get_device_properties",
    "manual_seed",
    "get_rng_state",
    "set_rng_state",
    "init",
}


@pytest.fixture
def cuda_log(monkeypatch):
    """torch.cuda with 8 fake GPUs; returns the list of (name, args) calls in order."""
    calls: list[tuple[str, tuple]] = []

    def rec(name, ret=None):
        def fn(*args, **kwargs):
            calls.append((name, args))
            return ret

        return fn

    props = types.SimpleNamespace(total_memory=80 * 2**30, name="FakeGPU")
    for name, ret in {
        "is_available": True,
        "device_count": 8,
        "is_initialized": False,
        "get_device_properties": props,
        "current_device": 0,
        "get_device_name": "FakeGPU",
    }.items():
        monkeypatch.setattr(torch.cuda, name, rec(name, ret))
    for name in _CONTEXT_CALLS - {"get_device_properties", "current_device"}:
        monkeypatch.setattr(torch.cuda, name, rec(name))
    return calls


def test_local_rank_falls_back_to_slurm_localid():
    env = {"RANK": "5", "WORLD_SIZE": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env(env).local_rank == 1
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env(env).local_rank == 3


def _mismatched_args() -> argparse.Namespace:
    """A model the CPU preset was not made for: the analytic prior (and its benchmark) runs."""
    return argparse.Namespace(
        flexsp_cost_model=None,
        num_layers=3,
        hidden_size=96,
        num_attention_heads=6,
        num_query_groups=None,
        ffn_hidden_size=None,
        swiglu=False,
        bf16=True,
        flexsp_sharding="fsdp2",
    )


def test_prior_benchmark_binds_the_local_gpu_first(cuda_log, monkeypatch):
    """The cost prior's matmul benchmark runs after set_device(local rank), not on GPU 0."""
    monkeypatch.setattr(
        cost_setup, "measure_matmul_flops", lambda device, **kw: cuda_log.append(("benchmark", (device,))) or 1e12
    )
    monkeypatch.setenv("LOCAL_RANK", "0")  # the old code read this instead of the launch's local rank
    cost_setup.resolve_cost_model(
        _mismatched_args(), world_size=8, local_ranks=8, cuda=True, vocab_size=128, local_rank=3
    )
    names = [n for n, _ in cuda_log if n in _CONTEXT_CALLS or n == "benchmark"]
    assert names[0] == "set_device", cuda_log
    assert torch.device(cuda_log[[n for n, _ in cuda_log].index("set_device")][1][0]).index == 3
    bench = next(a for n, a in cuda_log if n == "benchmark")
    assert bench[0] == torch.device("cuda", 3)


def test_gloo_run_makes_no_cuda_call(cuda_log):
    """Backend choice, process group, megatron's parallel state and seeding on gloo: no CUDA at all."""
    from flexsp_patches import cpu_compat
    from megatron.flexsp.training.distributed import LaunchEnv
    from megatron.flexsp.training.seeding import seed_everything

    assert device_for_backend("gloo") == ("gloo", torch.device("cpu"))
    assert cuda_log == [], "choosing gloo must not even ask CUDA"
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0)
    if not torch.distributed.is_initialized():
        device = init_distributed(env, "gloo")
        assert device.type == "cpu"
    cpu_compat.init_model_parallel(7, device_type="cpu")
    seed_everything(7, "cpu", 0)
    assert [c for c in cuda_log if c[0] in _CONTEXT_CALLS] == [], cuda_log


def test_cpu_seeding_matches_megatrons(cuda_log):
    """The CUDA-free seeding gives the tracker megatron's states (names and seeds)."""
    from megatron.core.tensor_parallel import random as mrandom

    from flexsp_patches import cpu_compat

    if not torch.distributed.is_initialized():
        pytest.skip("needs the process group of the previous test")
    cpu_compat.init_model_parallel(11, device_type="cpu")
    states = mrandom.get_cuda_rng_tracker().get_states()
    assert set(states) >= {"data-parallel-rng", "model-parallel-rng", "expert-parallel-rng"}
    g = torch.Generator().manual_seed(11 + 2718)
    assert torch.equal(states["model-parallel-rng"], g.get_state())
    assert [c for c in cuda_log if c[0] in _CONTEXT_CALLS] == [], cuda_log
