"""flexsp-profile: measure this cluster and model, write the cost-model JSON the planner uses.

Why: the planner is only as good as its cost model, and the cost model must come from the
users' hardware and model, not from a paper. Launched like the trainer (torchrun or srun, the
same model flags), it measures on every rank at once (as in training, where all ranks work), on
the trainer's own runtime (``profile_session``):

* memory (``profile_memory``), first: model states and the activation slope bound the rest.
  The limit is ``--memory-limit-gb`` (GPU default: 90% of the device; CPU default: half of
  MemAvailable split over the node's ranks), or ``--capacity-tokens N`` (limit set so one GPU
  holds N tokens: the artificial limit of the CPU test cluster).
* compute: forward+backward of one micro-batch at degree 1 (every rank its own group) through
  the real executor (FSDP2 collectives included), for single sequences of several lengths and
  for packs of equal sequences; alpha1, alpha2, beta1 by non-negative least squares on the
  relative error (timings span orders of magnitude); the fit error is printed.
* all-to-all (``profile_alltoall``): the effective bandwidth of every allowed degree >= 2.
* recomputation (``profile_recompute``, unless --profile-recompute off): activation MB per token,
  compute and all-to-all factors of selective and full recomputation (the optional "recompute" key).
* tensor parallelism (``profile_tensor_parallel``, with --tensor-model-parallel-size t > 1): the bus
  bandwidth of the t-rank TP all-reduce (the optional "tensor_parallel" key); the rest stays per GPU.

The fitting helpers (``fit_compute``, ``fit_bandwidth``, ``fit_linear``) live in the planner's
``fitting`` module (torch-free), shared with the online calibration of a training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from flexsp_patches import cpu_compat
from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.planner.fitting import ComputeFit, LinearFit, fit_bandwidth, fit_compute, fit_linear
from megatron.flexsp.runtime.model import GPTConfig

from . import arguments as A
from .configs import model_config_from_args
from .distributed import init_distributed, launch_env, run_entrypoint
from .profile_alltoall import profile_alltoall
from .profile_config import ProfileConfig, ProfileError, add_profiler_args, geometric, profile_config_from_args
from .profile_memory import GPU_MEMORY_PROBE_CAP, memory_probe_lengths, profile_memory
from .profile_recompute import profile_recompute
from .profile_report import ProfileReport
from .profile_session import ProfileSession
from .profile_tensor_parallel import allreduce_buffer_bytes, measure_allreduce, tensor_parallel_section, unit_ranks

__all__ = [
    "ProfileError",
    "ComputeFit",
    "LinearFit",
    "fit_compute",
    "fit_bandwidth",
    "fit_linear",
    "GPU_MEMORY_PROBE_CAP",
    "memory_probe_lengths",
    "ProfileConfig",
    "ProfileReport",
    "add_profiler_args",
    "profile_config_from_args",
    "run_profile",
    "profile",
    "main",
]


def _profile_compute(
    ses: ProfileSession, pcfg: ProfileConfig, tokens_per_gpu: int, log: Callable[[str], None]
) -> tuple[ComputeFit, list]:
    """Degree-1 forward+backward samples and the alpha-beta fit.

    On GPU a degree-1 sample must fit the device; on CPU the limit is a configured number, and
    timing up to --seq-length keeps alpha1 from being extrapolated far beyond the samples.
    """
    top = min(pcfg.max_len, tokens_per_gpu) if ses.cuda else pcfg.max_len
    lengths = sorted(set(pcfg.lengths)) if pcfg.lengths else geometric(max(32, top // 32), top, 6)
    too_long = [s for s in lengths if s > tokens_per_gpu] if ses.cuda else []
    if too_long:
        raise ProfileError(f"--profile-lengths {too_long} do not fit one GPU ({tokens_per_gpu} tokens)")
    if len(lengths) < 3:
        raise ProfileError(f"need at least three profile lengths, got {lengths}")
    samples = ses.compute_samples(lengths)
    fit = fit_compute([(s["lengths"], s["ms"]) for s in samples])
    log(
        f"[flexsp-profile] compute: {len(samples)} samples, fit error rms {100 * fit.rms_rel_err:.1f}% max "
        f"{100 * fit.max_rel_err:.1f}%"
    )
    return fit, samples


def _profile_tensor_parallel(
    ses: ProfileSession, pcfg: ProfileConfig, tokens_per_gpu: int, log: Callable[[str], None]
) -> dict | None:
    """At --tensor-model-parallel-size t > 1: the TP all-reduce bandwidth (the optional "tensor_parallel" key)."""
    t = pcfg.tensor_model_parallel_size
    if t == 1:
        return None
    e = ses.bytes_per_element
    nbytes = allreduce_buffer_bytes(min(tokens_per_gpu, pcfg.max_len), ses.cfg.hidden_size, e)
    r = measure_allreduce(
        t,
        nbytes,
        gpus_per_node=ses.gpus_per_node,
        device=ses.device,
        dtype=torch.bfloat16 if e == 2 else torch.float32,
        repeats=pcfg.a2a_repeats,
        warmup=pcfg.warmup,
        stat=min if pcfg.stat == "min" else statistics.median,
    )
    log(
        f"[flexsp-profile] TP {t} all-reduce: {r['bytes'] / 2**20:.1f} MiB in {r['ms']:.3f} ms, "
        f"bus bandwidth {r['allreduce_bandwidth_gbs']:.2f} GB/s per GPU"
    )
    return tensor_parallel_section(t, r["allreduce_bandwidth_gbs"])


def run_profile(
    model_cfg: GPTConfig,
    pcfg: ProfileConfig,
    device: torch.device,
    vocab_size: int,
    *,
    log: Callable[[str], None] = print,
) -> ProfileReport:
    """All measurements on the current process group (collective); returns the report on every rank."""
    pcfg.validate()
    t_start = time.perf_counter()
    ses = ProfileSession(model_cfg, pcfg, device, vocab_size)
    memory = profile_memory(ses, pcfg, device, log)
    recompute = None
    if pcfg.recompute:  # the optional "recompute" key (contract C4): per mode, measured on this runtime
        recompute, memory["recompute"] = profile_recompute(ses, pcfg, memory, log)
    fit, samples = _profile_compute(ses, pcfg, memory["tokens_per_gpu"], log)
    a2a, bandwidth = profile_alltoall(ses, pcfg, memory["tokens_per_gpu"], log)
    ses.pcfg.name = pcfg.name or (
        f"profiled: {model_cfg.num_layers}L h{model_cfg.hidden_size} on {ses.world} x "
        f"{torch.cuda.get_device_name(device) if ses.cuda else 'CPU (gloo)'}"
    )
    compute = {
        "alpha1_ms_per_token2": fit.alpha1_ms_per_token2,
        "alpha2_ms_per_token": fit.alpha2_ms_per_token,
        "beta1_ms": fit.beta1_ms,
    }
    cost_dict = ses.cost_dict(
        compute, bandwidth, memory["limit_gb"], memory["model_states_mb"], memory["activation_mb_per_token"]
    )
    if recompute:
        cost_dict["recompute"] = recompute
    tp = _profile_tensor_parallel(ses, pcfg, memory["tokens_per_gpu"], log)
    if tp is not None:
        cost_dict["tensor_parallel"] = tp
    cost = CostModel.from_dict(cost_dict)
    env = {
        "world_size": ses.world,
        "gpus_per_node": ses.gpus_per_node,
        "device": str(device),
        "backend": dist.get_backend(),
        "seconds": time.perf_counter() - t_start,
    }
    return ProfileReport(
        cost_model=cost.to_dict(),
        compute_fit=fit,
        compute_samples=samples,
        alltoall=a2a,
        memory=memory,
        environment=env,
    )


def profile(args: argparse.Namespace, env=None, *, log=print) -> ProfileReport:
    """Profile with the trainer's flags (pretrain_gpt_flexsp.py --flexsp-profile uses this).

    Initialises torch.distributed from the launch environment when needed; rank 0 writes
    ``output`` (ProfileConfig) and prints the summary. Returns the report on every rank.
    """
    pcfg = profile_config_from_args(args)
    env = env or launch_env()
    if pcfg.gpus_per_node is None:
        pcfg.gpus_per_node = env.local_world_size
    if pcfg.tensor_model_parallel_size > 1:  # before any work: the TP groups must split neither world nor node
        unit_ranks(env.world_size, pcfg.tensor_model_parallel_size, min(pcfg.gpus_per_node, env.world_size))
    device = init_distributed(env, getattr(args, "distributed_backend", None))
    cpu_compat.init_model_parallel(getattr(args, "seed", 1234), device_type=device.type)
    model_cfg = _one_tp_rank(model_config_from_args(args, cuda=device.type == "cuda"))
    report = run_profile(model_cfg, pcfg, device, model_cfg.vocab_size, log=log if env.rank == 0 else (lambda *_: None))
    if env.rank == 0:
        report.write(pcfg.output)
        log(report.format())
        log(f"[flexsp-profile] wrote {pcfg.output}")
    return report


def _one_tp_rank(model_cfg: GPTConfig) -> GPTConfig:
    """The model is profiled whole on each rank (the per-GPU cost model); --tensor-model-parallel-size only
    adds the all-reduce measure, from which ``planner.tensor_parallel.unit_cost_model`` derives a unit."""
    names = {f.name for f in dataclasses.fields(model_cfg)}
    off = {k: v for k, v in (("tensor_model_parallel_size", 1), ("sequence_parallel", False)) if k in names}
    return dataclasses.replace(model_cfg, **off) if off else model_cfg


def build_parser() -> argparse.ArgumentParser:
    p = A.build_parser()
    p.prog = "flexsp-profile"
    p.description = (
        "Measure compute, all-to-all bandwidth and memory of this model on this cluster and write the "
        "FlexSP cost-model JSON. Launch like the trainer (torchrun/srun) with the same model flags."
    )
    return add_profiler_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    """flexsp-profile: the profiler's flags first, the rest through the trainer's own parser (same defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0
    pargs, rest = add_profiler_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    args = A.parse_args(rest)
    for k, v in vars(pargs).items():
        setattr(args, k, v)

    def body() -> None:
        profile(args)

    return run_entrypoint("flexsp-profile", body, (ProfileError, A.ArgumentError, CostModelError))


if __name__ == "__main__":
    sys.exit(main())
