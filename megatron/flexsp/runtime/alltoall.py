"""Ulysses all-to-all between "my slice of the sequence, all heads" and "whole sequence, my heads".

Why one collective for q, k and v: each all-to-all has a fixed latency, and on a CPU or a slow
inter-node link the latency of three separate exchanges per layer dominates short sequences.
The tensors are laid out per destination rank ([P, s_local, q-chunk | k-chunk | v-chunk]) in
one contiguous buffer, exchanged once, and split back as views.

Conventions (P = group size, s = tokens per rank, T = P * s):

* seq -> head: every tensor ``[s, H, d]`` (H divisible by P) becomes ``[T, H / P, d]``; rank j
  receives head chunk j of every rank's slice, slices in rank order, so row t of the result
  is packed token t.
* head -> seq: the inverse, ``[T, h, d]`` -> ``[s, h * P, d]``.

Both are ``torch.autograd.Function`` s whose backward is the other exchange (the map is a
permutation of elements across ranks, so its adjoint is its inverse).

Communication time and volume go to a process-wide ``AllToAllStats`` (``get_stats()``) that
the executor reads and resets per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "AllToAllStats",
    "get_stats",
    "group_size",
    "check_heads",
    "kv_replication",
    "seq_to_head",
    "head_to_seq",
    "qkv_seq_to_head",
]


@dataclass
class AllToAllStats:
    """All-to-all calls, bytes and time of this rank (forward and backward).

    ``bytes`` counts whole send buffers (what the cost model's ``bytes_per_token`` counts);
    ``bytes_remote`` only the part that leaves the rank ((P - 1) / P of it).
    ``ms`` is wall time of the collectives; on CUDA it is measured with events and resolved
    (synchronising) when read.
    """

    calls: int = 0
    bytes: int = 0
    bytes_remote: int = 0
    _cpu_ms: float = 0.0
    _pending: list = field(default_factory=list, repr=False)

    def _record_cuda(self, start, end) -> None:
        self._pending.append((start, end))
        while self._pending and self._pending[0][1].query():  # fold finished ones, no sync
            s, e = self._pending.pop(0)
            self._cpu_ms += s.elapsed_time(e)

    @property
    def ms(self) -> float:
        for s, e in self._pending:
            e.synchronize()
            self._cpu_ms += s.elapsed_time(e)
        self._pending.clear()
        return self._cpu_ms

    def reset(self) -> None:
        self.calls = self.bytes = self.bytes_remote = 0
        self._cpu_ms = 0.0
        self._pending.clear()

    def snapshot(self) -> dict[str, float]:
        return {
            "a2a_calls": self.calls,
            "a2a_bytes": self.bytes,
            "a2a_bytes_remote": self.bytes_remote,
            "a2a_ms": self.ms,
        }


_STATS = AllToAllStats()


def get_stats() -> AllToAllStats:
    """The process-wide statistics object every exchange records into."""
    return _STATS


def group_size(group) -> int:
    """Size of an SP group; None (no group) counts as 1."""
    return 1 if group is None else dist.get_world_size(group)


def check_heads(num_heads: int, num_kv_heads: int, degree: int) -> None:
    """Raise ValueError unless Ulysses can split these heads over ``degree`` ranks."""
    if num_heads % degree:
        raise ValueError(
            f"SP degree {degree} does not divide the number of attention heads {num_heads}: "
            f"Ulysses gives every rank of the group num_heads / degree heads"
        )
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"number of query heads {num_heads} is not a multiple of the kv heads {num_kv_heads}")


def kv_replication(num_heads: int, num_kv_heads: int, degree: int) -> int:
    """How many times to repeat each kv head so every rank gets the kv heads its queries use.

    The smallest e dividing num_heads / num_kv_heads with (num_kv_heads * e) % degree == 0:
    then rank j's query heads [j H/P, (j+1) H/P) use exactly the replicated kv heads
    [j K e/P, (j+1) K e/P). e = 1 when the degree divides the kv heads (no extra volume).
    """
    check_heads(num_heads, num_kv_heads, degree)
    g = num_heads // num_kv_heads
    for e in range(1, g + 1):
        if g % e == 0 and (num_kv_heads * e) % degree == 0:
            return e
    raise AssertionError("unreachable: e = num_heads / num_kv_heads always works")  # pragma: no cover


# --------------------------------------------------------------------------- the exchange


def _exchange(send: torch.Tensor, group, stats: AllToAllStats) -> torch.Tensor:
    """One equal-split all_to_all_single of a contiguous [P, ...] buffer, timed and counted."""
    recv = torch.empty_like(send)
    nbytes = send.numel() * send.element_size()
    p = send.shape[0]
    if send.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(recv, send, group=group)
        end.record()
        stats._record_cuda(start, end)
    else:
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send, group=group)
        stats._cpu_ms += (time.perf_counter() - t0) * 1e3
    stats.calls += 1
    stats.bytes += nbytes
    stats.bytes_remote += nbytes * (p - 1) // p
    return recv


def _first_dim(tensors: Sequence[torch.Tensor], what: str, n: str) -> int:
    """The one first dimension ``n`` of ``tensors``, each [n, heads, dim]; else a ValueError from ``what``."""
    first = tensors[0].shape[0]
    if any(t.dim() != 3 or t.shape[0] != first for t in tensors):
        raise ValueError(
            f"{what} expects [{n}, heads, dim] tensors with one {n}, got {[tuple(x.shape) for x in tensors]}"
        )
    return first


def _s2h(tensors: Sequence[torch.Tensor], group, p: int, stats: AllToAllStats) -> list[torch.Tensor]:
    s = _first_dim(tensors, "seq_to_head", "s")
    for t in tensors:
        if t.shape[1] % p:
            raise ValueError(f"seq_to_head: {t.shape[1]} heads are not divisible by the SP degree {p}")
    # [s, H_i, d_i] -> [P, s, H_i/P * d_i] per tensor, concatenated per destination: one buffer.
    send = torch.cat([t.reshape(s, p, -1).transpose(0, 1) for t in tensors], dim=2).contiguous()
    recv = _exchange(send, group, stats).view(p * s, -1)
    widths = [t.shape[1] // p * t.shape[2] for t in tensors]
    return [x.view(p * s, t.shape[1] // p, t.shape[2]) for x, t in zip(recv.split(widths, dim=1), tensors)]


def _h2s(tensors: Sequence[torch.Tensor], group, p: int, stats: AllToAllStats) -> list[torch.Tensor]:
    total = _first_dim(tensors, "head_to_seq", "T")
    if total % p:
        raise ValueError(f"head_to_seq: {total} tokens are not divisible by the SP degree {p}")
    s = total // p
    parts = [t.reshape(p, s, -1) for t in tensors]
    # one tensor: reshape already copied a non-contiguous input, so skip cat's second copy
    send = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=2)
    recv = _exchange(send, group, stats)  # [P(head chunk), s, N]
    widths = [t.shape[1] * t.shape[2] for t in tensors]
    return [
        x.transpose(0, 1).reshape(s, t.shape[1] * p, t.shape[2]) for x, t in zip(recv.split(widths, dim=2), tensors)
    ]


class _AllToAll(torch.autograd.Function):
    """One all-to-all: ``fwd`` (_s2h or _h2s) forward, its inverse ``bwd`` backward."""

    @staticmethod
    def forward(ctx, fwd, bwd, group, stats, *tensors):
        ctx.bwd, ctx.group, ctx.stats, ctx.p = bwd, group, stats, group_size(group)
        return tuple(fwd(tensors, group, ctx.p, stats))

    @staticmethod
    def backward(ctx, *grads):
        # materialize_grads (the default) turns unused outputs' grads into zeros.
        return (None, None, None, None, *ctx.bwd(grads, ctx.group, ctx.p, ctx.stats))


def _all_to_all(fwd, bwd, tensors, group, stats: AllToAllStats | None) -> tuple[torch.Tensor, ...]:
    if group_size(group) == 1:
        return tuple(tensors)
    return _AllToAll.apply(fwd, bwd, group, _STATS if stats is None else stats, *tensors)


def seq_to_head(tensors: Sequence[torch.Tensor], group, stats: AllToAllStats | None = None) -> tuple[torch.Tensor, ...]:
    """[s, H_i, d_i] each -> [P*s, H_i/P, d_i] each, in ONE all-to-all (identity when P == 1)."""
    return _all_to_all(_s2h, _h2s, tensors, group, stats)


def head_to_seq(tensors: Sequence[torch.Tensor], group, stats: AllToAllStats | None = None) -> tuple[torch.Tensor, ...]:
    """[T, h_i, d_i] each -> [T/P, h_i*P, d_i] each, in ONE all-to-all (identity when P == 1)."""
    return _all_to_all(_h2s, _s2h, tensors, group, stats)


def qkv_seq_to_head(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, stats: AllToAllStats | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ulysses input exchange of attention: q [s, H, d], k/v [s, K, d] -> [T, H/P, d], [T, K e/P, d].

    kv heads are repeated (e = ``kv_replication``) before the exchange when the degree exceeds
    the kv heads, so the local GQA ratio stays an integer and every rank gets the kv heads its
    query heads use; a degree that does not divide the query heads is a ValueError.
    """
    p = group_size(group)
    check_heads(q.shape[1], k.shape[1], p)
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"key has {k.shape[1]} heads but value has {v.shape[1]}")
    if p == 1:
        return q, k, v
    e = kv_replication(q.shape[1], k.shape[1], p)
    if e > 1:
        k = k.repeat_interleave(e, dim=1)
        v = v.repeat_interleave(e, dim=1)
    q2, k2, v2 = seq_to_head([q, k, v], group, stats)
    return q2, k2, v2
