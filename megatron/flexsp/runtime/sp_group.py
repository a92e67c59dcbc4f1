"""The micro-batch's SP group: entered once per micro-batch, carried to attention by the data.

Why one carrier: the group of a micro-batch is decided by the plan and changes every micro-batch.
``sp_group`` looks it up in the pool once, and ``packed_seq_params`` puts it on the micro-batch's
``PackedSeqParams`` (``cp_group`` / ``local_cp_size``, megatron-core 0.16.1+), which megatron
hands to every layer's core attention: FlexSP's attention reads the group from there and
nowhere else. While the block runs, megatron.core code that still asks parallel_state for the
context-parallel group gets the same group (``flexsp_patches.parallel_state.redirect``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from flexsp_patches import parallel_state as ps_patch

from .group_pool import GroupPool
from .packing import PackedSlice

__all__ = ["ActiveSPGroup", "sp_group", "packed_seq_params"]


@dataclass(frozen=True)
class ActiveSPGroup:
    """This rank's SP group for one micro-batch."""

    group: Any  # torch.distributed.ProcessGroup
    ranks: tuple[int, ...]  # global ranks, position = rank inside the group
    rank: int  # this process's rank inside the group

    @property
    def world_size(self) -> int:
        return len(self.ranks)


@contextlib.contextmanager
def sp_group(pool: GroupPool, ranks: Sequence[int]) -> Iterator[ActiveSPGroup]:
    """Enter the pool's group of ``ranks`` for one micro-batch (parallel_state answers for it).

    Raises (locally, before any communication) if the group is not in the pool or this rank is
    not one of its members; since every rank reads the same plan, every rank raises alike.
    """
    group = pool.get(ranks)  # GroupPoolError naming the ranks and the pool if absent
    key = tuple(int(r) for r in ranks)
    me = dist.get_rank()
    if me not in key:
        raise ValueError(f"rank {me} cannot enter SP group {list(key)}: it is not a member")
    active = ActiveSPGroup(group=group, ranks=key, rank=key.index(me))
    with ps_patch.redirect(group, key, active.rank):
        yield active


def packed_seq_params(
    packed: PackedSlice, active: ActiveSPGroup | None = None, device: torch.device | str | None = None
) -> PackedSeqParams:
    """The micro-batch's PackedSeqParams: the packed group's layout (q and kv alike) and its SP group.

    Without ``active`` the data states degree 1 by leaving the group out (single-process use).
    """
    cu = packed.cu_seqlens if device is None else packed.cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(packed.max_seqlen),
        max_seqlen_kv=int(packed.max_seqlen),
        cp_group=None if active is None else active.group,
        local_cp_size=None if active is None else active.world_size,
    )
