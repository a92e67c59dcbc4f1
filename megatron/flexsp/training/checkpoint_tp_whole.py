"""Loading a ``torch``-format checkpoint (whole tensors in model.pt / optim.pt, read by rank 0) into a
tensor-parallel run.

Why: the one-file format holds the TP 1 model (flexsp-convert hf-to-flexsp writes it, and so did every
run before TP), while a TP run's ranks each hold a part of every split tensor. Rank 0 broadcasts the
whole tensors one at a time and every rank copies out its boxes (``checkpoint_tp``) or its FSDP2
shard: memory for one whole tensor at a time, the same traffic as torch's own broadcast-from-rank-0
load. Shapes are checked on every rank before any tensor moves, so a mismatch is one error, not a hang.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .checkpoint_format import CheckpointError
from .checkpoint_tp import TensorParallelPiece
from .distributed import broadcast_object

__all__ = ["scatter_whole"]


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, (torch.Tensor, TensorParallelPiece))


def _skeleton(tree: Any) -> Any:
    """``tree`` with every tensor replaced by ("tensor", shape): what every rank needs to check and allocate."""
    if isinstance(tree, torch.Tensor):
        return ("tensor", tuple(tree.shape))
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_skeleton(v) for v in tree]
    return tree


def _mismatches(template: Any, skel: Any, path: str, out: list[str]) -> None:
    if _is_tensor(template):
        want = tuple(template.shape)
        if not (isinstance(skel, tuple) and skel[:1] == ("tensor",)):
            out.append(f"{path} missing")
        elif tuple(skel[1]) != want:
            out.append(f"{path} has shape {list(skel[1])}, this model {list(want)}")
    elif isinstance(template, dict):
        for k, v in template.items():
            sub = skel.get(k) if isinstance(skel, dict) else None
            _mismatches(v, sub, f"{path}.{k}" if path else str(k), out)


def _region(whole: torch.Tensor, offsets: Any, sizes: Any) -> torch.Tensor:
    """The box of ``whole`` at ``offsets`` of ``sizes`` (a view)."""
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        whole = whole.narrow(d, o, n)
    return whole


def _place(template: Any, whole: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor into the template's storage."""
    if isinstance(template, TensorParallelPiece):
        for b in template.boxes:
            template.local.narrow(b.dim, b.start, b.length).copy_(_region(whole, b.offsets, b.sizes))
    elif hasattr(template, "__create_chunk_list__"):  # DTensor: its FSDP2 shard
        (chunk,) = template.__create_chunk_list__()
        template.to_local().copy_(_region(whole, chunk.offsets, chunk.sizes))
    else:
        template.copy_(whole)


def _fill(template: Any, whole: Any, skel: Any, device: torch.device) -> Any:
    if _is_tensor(template):
        dtype = template.local.dtype if isinstance(template, TensorParallelPiece) else template.dtype
        if whole is not None:  # rank 0
            buf = whole.detach().to(device=device, dtype=dtype).contiguous()
        else:
            buf = torch.empty(tuple(skel[1]), dtype=dtype, device=device)
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            _place(template, buf)
        return template
    if isinstance(template, dict) and isinstance(skel, dict):
        out = {
            k: _fill(v, whole.get(k) if whole is not None else None, skel.get(k), device) for k, v in template.items()
        }
        out.update({k: v for k, v in skel.items() if k not in out})  # values only the checkpoint has
        return out
    return skel  # non-tensor values (the optimizer's param_groups): the checkpoint's


def scatter_whole(template: Any, whole: Any, what: str) -> Any:
    """Collective: ``template`` (this rank's sharded state dict, TP-split tensors as pieces) filled from
    rank 0's ``whole`` state dict (whole tensors; None on the other ranks); non-tensor values are rank 0's."""
    skel = broadcast_object(_skeleton(whole) if dist.get_rank() == 0 else None)
    bad: list[str] = []
    _mismatches(template, skel, "", bad)
    if bad:
        raise CheckpointError(f"the checkpoint's {what} does not fit this model: {', '.join(bad[:4])}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return _fill(template, whole, skel, device)
