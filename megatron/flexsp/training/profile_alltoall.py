"""All-to-all bandwidth: for every allowed degree d >= 2, all of the pool's groups of degree d
exchange at once the real attention messages (q, k, v in one collective, then the output;
forward and backward, kv heads replicated as the runtime does), for groups filled to 1/4, 1/2
and all of a GPU's token capacity.

Why "effective": the wall time per layer, times the layers, gives the bandwidth that makes the
cost model's formula (bytes_per_token * T / d / 2^20 / bw) reproduce the measured exchange
time, copies included; the collective's own bandwidth is reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron.flexsp.planner.fitting import fit_bandwidth
from megatron.flexsp.runtime.alltoall import AllToAllStats, head_to_seq, qkv_seq_to_head

from .profile_config import ProfileConfig
from .profile_session import ProfileSession

__all__ = ["measure_alltoall", "profile_alltoall"]


def _layer_inputs(ses: ProfileSession, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v of one layer for ``tokens`` tokens on this rank."""
    c = ses.cfg
    dh = c.kv_channels or c.hidden_size // c.num_attention_heads
    dtype = torch.bfloat16 if c.bf16 else torch.float32
    return tuple(  # type: ignore[return-value]
        torch.randn(tokens, h, dh, device=ses.device, dtype=dtype, requires_grad=True)
        for h in (ses.heads, ses.groups, ses.groups)
    )


def _time_layer(ses: ProfileSession, group: Any, qkv: tuple, in_group: bool) -> tuple[list, list]:
    """Wall ms per layer (slowest rank) and (collective ms, bytes) of every timed repetition."""
    q, k, v = qkv
    walls, colls = [], []
    for i in range(ses.pcfg.warmup + ses.pcfg.a2a_repeats):
        stats = AllToAllStats()
        dist.barrier()
        ses.sync()
        t0 = time.perf_counter()
        if in_group:
            q2, k2, v2 = qkv_seq_to_head(q, k, v, group, stats)
            (o,) = head_to_seq([q2 + 0.0], group, stats)  # stands in for the attention output
            (o.sum() + k2.sum() + v2.sum()).backward()
        ses.sync()
        wall = ses.max((time.perf_counter() - t0) * 1e3)
        cms = ses.max(stats.ms if in_group else 0.0)
        if i >= ses.pcfg.warmup:
            walls.append(wall)
            colls.append((cms, stats.bytes))
    return walls, colls


def measure_alltoall(ses: ProfileSession, degree: int, tokens_per_rank: Sequence[int]) -> dict[str, Any]:
    """Effective bandwidth of degree ``degree``: every pool group of that degree exchanges at once."""
    ranks = ses.pool.group_of(ses.rank, degree)
    group = ses.pool.get(ranks) if ranks is not None else None
    bpt = ses.alltoall_bytes_per_token()
    samples, coll = [], []
    for s in tokens_per_rank:
        walls, colls = _time_layer(ses, group, _layer_inputs(ses, s), ranks is not None)
        model_mb = bpt * s * degree / degree / 2**20  # formula MB per rank for T = s * degree tokens
        samples.append((model_mb, ses.stat(walls) * ses.cfg.num_layers))
        coll.append((ses.max(colls[0][1]) / 2**20, ses.stat([x for x, _ in colls])))
    return {
        "bandwidth_gbs": fit_bandwidth(samples),
        "collective_gbs": fit_bandwidth(coll) if all(m > 0 for _, m in coll) else float("nan"),
        "tokens_per_rank": list(tokens_per_rank),
        "samples_mb_ms": samples,
    }


def profile_alltoall(
    ses: ProfileSession, pcfg: ProfileConfig, tokens_per_gpu: int, log: Callable[[str], None]
) -> tuple[dict[int, dict[str, Any]], dict[str, float]]:
    """Effective bandwidth per allowed degree >= 2 (groups filled to 1/4, 1/2 and all of a GPU's tokens)."""
    a2a: dict[int, dict[str, Any]] = {}
    cap_rank = min(tokens_per_gpu, pcfg.max_len)
    for d in ses.degrees:
        if d > 1:
            a2a[d] = measure_alltoall(ses, d, sorted({max(1, cap_rank // 4), max(1, cap_rank // 2), cap_rank}))
    if not a2a and ses.world > 1:
        log("[flexsp-profile] warning: no degree >= 2 is allowed (heads/topology); the model allows degree 1 only")
    bandwidth = {str(d): a["bandwidth_gbs"] for d, a in a2a.items()}
    if not bandwidth:
        # The JSON form needs one entry. Nothing was measured (one rank, or no degree >= 2 divides
        # the heads), so the entry goes to a degree that does not divide the head count: the cost
        # model can never allow it, and no plan can use an unmeasured bandwidth.
        never = next(d for d in range(2, ses.heads + 2) if ses.heads % d)
        bandwidth = {str(never): 1.0}
        log(
            f"[flexsp-profile] no all-to-all measured (world size {ses.world}); placeholder bandwidth on degree "
            f"{never}, which {ses.heads} heads never allow: profile on the real node count before training on it"
        )
    return a2a, bandwidth
