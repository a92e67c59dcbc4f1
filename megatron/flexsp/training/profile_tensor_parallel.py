"""The TP all-reduce bandwidth: ``flexsp-profile --tensor-model-parallel-size t`` times the all-reduce of a
group of t consecutive ranks inside a node, every unit at once (as in training, where all units work).

Why: a unit of t GPUs pays, per layer and token, two all-reduces of ``h e`` bytes in forward and two in
backward (``planner.tensor_parallel``); their link is the node's fastest, which the all-to-all table
only hints at. The result is the bus bandwidth per GPU, the form ``unit_cost_model`` reads: a ring
all-reduce of B bytes moves ``2 (t-1)/t B`` over each GPU's link, so ``GB/s = 2 (t-1)/t B / time``.
It is written to the cost model's optional key ``"tensor_parallel": {"allreduce_bandwidth_gbs": {"t": GB/s}}``.

The buffer is what one layer all-reduces for the tokens a GPU holds (``tokens h e`` bytes), clipped to
[1 MiB, 256 MiB]: small buffers are latency-bound and would understate the link.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .profile_config import ProfileError

__all__ = ["allreduce_buffer_bytes", "measure_allreduce", "tensor_parallel_section", "unit_ranks"]

MIN_BUFFER_BYTES = 2**20
MAX_BUFFER_BYTES = 256 * 2**20


def unit_ranks(world: int, tp: int, gpus_per_node: int) -> list[list[int]]:
    """The TP groups: t consecutive ranks each; ProfileError if t splits the world or a node."""
    if tp < 1 or world % tp or gpus_per_node % tp:
        raise ProfileError(
            f"--tensor-model-parallel-size {tp} must divide the world size {world} and the gpus per node "
            f"{gpus_per_node} (a TP group lies in one node)"
        )
    return [list(range(u * tp, (u + 1) * tp)) for u in range(world // tp)]


def allreduce_buffer_bytes(tokens: int, hidden_size: int, bytes_per_element: int) -> int:
    """One layer's all-reduce for ``tokens`` tokens, clipped to [1 MiB, 256 MiB] (module docstring)."""
    return int(min(MAX_BUFFER_BYTES, max(MIN_BUFFER_BYTES, tokens * hidden_size * bytes_per_element)))


def measure_allreduce(
    tp: int,
    nbytes: int,
    *,
    gpus_per_node: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 2,
    stat: Callable[[list[float]], float] = statistics.median,
) -> dict[str, Any]:
    """Bus bandwidth (GB/s per GPU) of every unit's all-reduce at once; collective over the whole world.

    Each rank first reduces its rank + 1 and checks the unit's sum, so a wrong group fails loudly."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(r) for r in unit_ranks(world, tp, gpus_per_node)]  # every rank makes every group
    mine = groups[rank // tp]
    n = max(1, nbytes // (torch.finfo(dtype).bits // 8))
    buf = torch.full((n,), float(rank + 1), device=device, dtype=dtype)
    dist.all_reduce(buf, group=mine)
    first = rank // tp * tp
    expected = sum(range(first + 1, first + tp + 1))
    if float(buf[0]) != expected:
        raise ProfileError(f"TP all-reduce check: rank {rank} got {float(buf[0])}, its unit sums to {expected}")
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=mine)
        _sync(device)
        slowest = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(slowest))
    ms = stat(times)
    moved = 2 * (tp - 1) / tp * n * buf.element_size()
    return {"allreduce_bandwidth_gbs": moved / (ms / 1e3) / 1e9, "bytes": n * buf.element_size(), "ms": ms}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_parallel_section(tp: int, gbs: float) -> dict[str, Any]:
    """The cost model's optional key for a measured TP size (``planner.tensor_parallel.allreduce_bandwidth``)."""
    return {"allreduce_bandwidth_gbs": {str(tp): gbs}}
