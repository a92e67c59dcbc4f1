"""Exact global token-mean cross entropy, computed locally on each rank's slice.

Why: FlexSP splits a global batch into micro-batches and SP groups of different sizes; a mean
per micro-batch or per rank would weight tokens unequally. Each rank instead contributes
``sum(its token losses) / tokens in the whole global batch``; summing these contributions (and
their gradients) over all ranks gives exactly the token mean over the global batch, whatever the
plan. Padding has loss mask 0 and never counts, neither in the numerator nor in the denominator.

Tensor parallelism: megatron's vocab-parallel cross entropy (the model's ``labels=`` path) gives
every rank of a TP unit the same per-token losses of the unit's tokens, so the reported mean sums
over one rank per unit (``token_group``: the ranks of this TP rank), counting each token once.
The backward needs no change: each TP rank back-propagates the same loss through its partition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["global_batch_tokens", "masked_loss_sum", "scaled_loss", "all_reduce_loss", "token_group"]


def global_batch_tokens(lengths) -> int:
    """Tokens that carry a loss in the global batch (sum of L_i); must be positive."""
    total = int(sum(int(x) for x in lengths))
    if total <= 0:
        raise ValueError(f"global batch has {total} loss tokens; it needs at least one")
    return total


def masked_loss_sum(token_losses: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of per-token losses where ``loss_mask`` is 1 (fp32 accumulation); shapes must match."""
    if token_losses.shape != loss_mask.shape:
        raise ValueError(
            f"token losses {tuple(token_losses.shape)} and loss mask {tuple(loss_mask.shape)} differ in shape"
        )
    return (token_losses.float() * loss_mask.float()).sum()


def scaled_loss(token_losses: Tensor, loss_mask: Tensor, global_tokens: int) -> Tensor:
    """This rank's share of the global mean: masked sum / tokens of the global batch."""
    if global_tokens <= 0:
        raise ValueError(f"global_tokens must be positive, got {global_tokens}")
    return masked_loss_sum(token_losses, loss_mask) / float(global_tokens)


def all_reduce_loss(local_loss_sum: float | Tensor, global_tokens: int, group=None) -> float:
    """Global token-mean loss from every rank's (detached) masked loss sum; same on every rank.

    The sum is reduced in float64 so the reported loss does not depend on the plan's split.
    """
    t = torch.as_tensor(local_loss_sum, dtype=torch.float64).detach().reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend(group)
        if backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t.item()) / float(global_tokens)


def token_group(tensor_model_parallel_size: int = 1):
    """The group whose loss sums add up to each token once: None (the world) at TP 1, else
    megatron's data-parallel group, the ranks with this rank's TP rank (one per unit)."""
    if tensor_model_parallel_size == 1:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()
