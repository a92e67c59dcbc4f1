"""Memory: model states, the per-token activation slope, and the tokens one GPU holds.

GPU: ``torch.cuda.max_memory_allocated`` during forward+backward above the model-state baseline
(``memory_allocated`` after an optimizer step, i.e. sharded params + grads + Adam moments); the
per-token slope over several lengths is ``activation_mb_per_token`` and the intercept (gathered
layer weights, workspaces) is added to ``model_states_mb``. CPU: there is no allocator peak, so
bytes are counted instead: model states are the summed sizes of this rank's parameter shards,
gradients and optimizer-state tensors; the activation is the summed size of the distinct
storages autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``, with the
inputs a recomputation checkpoint keeps: ``runtime.recompute.SavedBytesMeter``) during the
forward, slope over lengths as on GPU. Transient buffers freed within the forward are not
counted (they are not held per token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from megatron.flexsp.planner.fitting import fit_linear
from megatron.flexsp.runtime.recompute import SavedBytesMeter

from .profile_config import ProfileConfig, ProfileError, geometric
from .profile_session import ProfileSession

__all__ = ["GPU_MEMORY_PROBE_CAP", "memory_probe_lengths", "model_states_mb", "activation_mb", "profile_memory"]

# On GPU the memory probe stays small: activation memory is linear in tokens, so there is no need
# to go near the device's limit (a long probe only costs start-up time).
GPU_MEMORY_PROBE_CAP = 8192


def memory_probe_lengths(max_len: int, cuda: bool) -> list[int]:
    """Four lengths for the activation-memory slope: geometric up to --seq-length (capped on GPU).

    The series is built up to the cap, not filtered after: filtering a series up to 65536 at 8192
    kept a single length, and a slope needs two.
    """
    top = min(max_len, GPU_MEMORY_PROBE_CAP) if cuda else max_len
    if top < 64:
        return [16, 32, 64]
    return geometric(max(16, top // 16), top, 4)


def _local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of this rank's part of ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        if torch.is_tensor(t):
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def model_states_mb(ses: ProfileSession) -> float:
    """After one optimizer step: GPU allocator bytes; CPU summed bytes of shards, grads, Adam state."""
    plan = ses.degree1_plan([16])
    ses.executor.run(plan, ses.seqs(plan.lengths))
    ses.optimizer.step()  # materialises Adam moments (lr 0: weights unchanged)
    ses.sync()
    if ses.cuda:
        return ses.max(torch.cuda.memory_allocated(ses.device) / 2**20)
    params = list(ses.model.parameters())
    total = _local_bytes(params) + _local_bytes(p.grad for p in params if p.grad is not None)
    total += sum(_local_bytes(st.values()) for st in ses.optimizer.state.values())
    return ses.max(total / 2**20)


def activation_mb(ses: ProfileSession, length: int) -> float:
    """Activation MB of one sequence of ``length`` at degree 1 (largest rank)."""
    plan = ses.degree1_plan([length])
    seqs = ses.seqs(plan.lengths)
    if ses.cuda:
        ses.sync()
        torch.cuda.reset_peak_memory_stats(ses.device)
        base = torch.cuda.memory_allocated(ses.device)
        ses.executor.run(plan, seqs)
        ses.sync()
        return ses.max((torch.cuda.max_memory_allocated(ses.device) - base) / 2**20)
    with SavedBytesMeter() as meter:  # ops' saved tensors and the inputs a recompute checkpoint keeps
        ses.executor.run(plan, seqs)
    return ses.max(meter.bytes / 2**20)


def _default_limit_gb(pcfg: ProfileConfig, cuda: bool, device: torch.device, local_ranks: int) -> float:
    """--memory-limit-gb, else the GPU's --memory-fraction, else half of MemAvailable per local rank."""
    if pcfg.memory_limit_gb is not None:
        return pcfg.memory_limit_gb
    if cuda:
        return torch.cuda.get_device_properties(device).total_memory * pcfg.memory_fraction / 2**30
    avail_kb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail_kb = int(line.split()[1])
    except OSError:
        pass
    if avail_kb is None:
        raise ProfileError("cannot read MemAvailable from /proc/meminfo: give --memory-limit-gb or --capacity-tokens")
    return avail_kb / 2**20 / 2 / max(1, local_ranks)


def profile_memory(
    ses: ProfileSession, pcfg: ProfileConfig, device: torch.device, log: Callable[[str], None]
) -> dict[str, Any]:
    """Model states and the activation slope; the limit and the tokens one GPU holds (first: it bounds the rest)."""
    states = model_states_mb(ses)
    mem_lengths = memory_probe_lengths(pcfg.max_len, ses.cuda)
    act = [activation_mb(ses, s) for s in mem_lengths]
    lin = fit_linear(mem_lengths, act)
    if lin.slope <= 0:
        raise ProfileError(
            f"activation memory does not grow with length ({dict(zip(mem_lengths, act))} MB): "
            "cannot derive a per-token cost"
        )
    fixed = max(0.0, lin.intercept)
    states_total = states + fixed
    if pcfg.capacity_tokens is not None:
        limit_gb = (states_total + lin.slope * pcfg.capacity_tokens) / 1024 * (1 + 1e-9)
    else:
        limit_gb = _default_limit_gb(pcfg, ses.cuda, device, ses.gpus_per_node)
    if states_total >= limit_gb * 1024:
        raise ProfileError(
            f"model states need {states_total:.1f} MB per GPU, above the memory limit "
            f"{limit_gb * 1024:.1f} MB: use more GPUs or raise --memory-limit-gb"
        )
    tokens_per_gpu = int((limit_gb * 1024 - states_total) / lin.slope)
    log(
        f"[flexsp-profile] memory: states {states:.3f} MB + fixed {fixed:.3f} MB, activation "
        f"{lin.slope:.5f} MB/token, limit {limit_gb:.4g} GB -> {tokens_per_gpu} tokens per GPU"
    )
    return {
        "method": "cuda max_memory_allocated" if ses.cuda else "tensor bytes (saved_tensors_hooks + states)",
        "model_states_mb": states_total,
        "measured_states_mb": states,
        "fixed_mb": fixed,
        "activation_mb_per_token": lin.slope,
        "limit_gb": limit_gb,
        "tokens_per_gpu": tokens_per_gpu,
        "samples": dict(zip(mem_lengths, act)),
    }
