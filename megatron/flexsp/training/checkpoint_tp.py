"""Tensor-parallel partitions in the sharded checkpoint, stored as pieces of the whole (TP 1) tensors.

Why: at TP > 1 each rank holds one TP partition of the split parameters (and of their optimizer
moments), and FSDP2 shards that partition again over the units. Saved under the parameter's name
with the partition's shape, every TP rank would claim the same chunks of the same tensor, and DCP
keeps one of them: the checkpoint silently loses all partitions but one. Here every rank instead
describes its local tensor as boxes of the whole tensor, the one a 1-process model holds, so the
checkpoint *is* the TP 1 model's, and DCP's resharding reads any other layout (TP 1, 2, 4, any
number of units) from it, each rank only its own boxes: no gather, no communication.

Megatron splits a tensor along its partition dim into t * stride blocks and gives TP rank j the
blocks j, j + t, ... (stride 2: SwiGLU's FC1 keeps a gate and an up block on each rank); a rank's
FSDP rows of its partition may therefore cross a block boundary and become two boxes.

``TensorParallelPiece`` carries one tensor's boxes inside the state dict, so the data and its layout
travel together through staging (async save), the NaN check, the signature and DCP's flattening;
``PieceSavePlanner`` / ``PieceLoadPlanner`` turn pieces into DCP write and read items.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_local_load_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = [
    "Box",
    "PieceSavePlanner",
    "TensorParallelPiece",
    "has_pieces",
    "load_plan_with_pieces",
    "lookup_piece",
    "optimizer_pieces",
    "model_pieces",
    "unwrap_pieces",
]


@dataclass(frozen=True)
class Box:
    """Rows ``[start, start + length)`` of the local tensor along ``dim`` = the whole tensor's box at ``offsets``."""

    dim: int
    start: int
    length: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class TensorParallelPiece:
    """This rank's part of one TP-split tensor: ``local`` (its FSDP shard of its TP partition, or the whole
    partition without FSDP), the whole tensor's shape, and the boxes of it that ``local`` holds.
    ``source`` is the state dict's original value (a DTensor), restored by ``unwrap_pieces``; ``local``
    is a view of its storage, so a load into the boxes lands in it."""

    local: torch.Tensor
    shape: torch.Size
    boxes: tuple[Box, ...]
    source: Any = None

    def box_tensor(self, offsets: tuple[int, ...]) -> torch.Tensor:
        for b in self.boxes:
            if b.offsets == tuple(offsets):
                return self.local.narrow(b.dim, b.start, b.length)
        raise KeyError(f"no box at {tuple(offsets)}")

    def to_local(self) -> torch.Tensor:
        """The rank's own data, as a DTensor's ``to_local`` (so tensor walkers treat both alike)."""
        return self.local

    def staged(self) -> TensorParallelPiece:
        """A host copy for an asynchronous save (training goes on updating ``local`` in place)."""
        return TensorParallelPiece(self.local.detach().to("cpu", copy=True), self.shape, self.boxes)


def boxes_of(
    local_offsets: tuple[int, ...], local_sizes: tuple[int, ...], dim: int, stride: int, t: int, j: int, part: int
) -> tuple[Box, ...]:
    """The whole-tensor boxes of a local box (``local_offsets``/``local_sizes`` inside TP rank ``j``'s
    partition of length ``part`` along ``dim``); empty when the local box is empty."""
    if any(s == 0 for s in local_sizes):
        return ()
    block = part // stride
    lo, hi = local_offsets[dim], local_offsets[dim] + local_sizes[dim]
    out = []
    x = lo
    while x < hi:
        k = x // block
        end = min(hi, (k + 1) * block)
        offsets = list(local_offsets)
        offsets[dim] = (k * t + j) * block + (x - k * block)
        sizes = list(local_sizes)
        sizes[dim] = end - x
        out.append(Box(dim, x - lo, end - x, tuple(offsets), tuple(sizes)))
        x = end
    return tuple(out)


def _piece(value: torch.Tensor, dim: int, stride: int, t: int, j: int) -> TensorParallelPiece:
    """``value`` (a DTensor over the units, or this rank's plain partition) as a piece of the whole tensor."""
    part_shape = tuple(value.shape)
    if hasattr(value, "__create_chunk_list__"):  # DTensor: its FSDP shard's place inside the partition
        (chunk,) = value.__create_chunk_list__()
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        local = value.to_local()
    else:
        offsets, sizes, local = (0,) * len(part_shape), part_shape, value
    whole = list(part_shape)
    whole[dim] *= t
    boxes = boxes_of(offsets, sizes, dim, stride, t, j, part_shape[dim])
    return TensorParallelPiece(local.detach(), torch.Size(whole), boxes, source=value)


def model_pieces(sd: dict[str, Any], layout: dict[str, tuple[int, int]], t: int, j: int) -> dict[str, Any]:
    """A model's sharded state dict with its TP-split entries (``layout``: name -> (dim, stride)) as pieces."""
    if t == 1:
        return sd
    return {k: _piece(v, *layout[k], t, j) if k in layout else v for k, v in sd.items()}


def optimizer_pieces(sd: dict[str, Any], layout: dict[str, tuple[int, int]], t: int, j: int) -> dict[str, Any]:
    """An optimizer's sharded state dict (``{"state": {name: {key: tensor}}, ...}``) with the per-element
    states of TP-split parameters (Adam's moments: the parameter's shape) as pieces; scalars such as
    ``step`` stay as they are (the same on every rank)."""
    if t == 1:
        return sd
    state = {}
    for name, st in sd.get("state", {}).items():
        if name in layout:
            st = {
                k: _piece(v, *layout[name], t, j) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in st.items()
            }
        state[name] = st
    return {**sd, "state": state}


def has_pieces(tree: Any) -> bool:
    """Whether a (nested) state dict holds a piece."""
    if isinstance(tree, TensorParallelPiece):
        return True
    return isinstance(tree, dict) and any(has_pieces(v) for v in tree.values())


def unwrap_pieces(tree: Any) -> Any:
    """The state dict with every piece replaced by its ``source`` (which a load has filled in place)."""
    if isinstance(tree, TensorParallelPiece):
        return tree.source
    if isinstance(tree, dict):
        return {k: unwrap_pieces(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------------ DCP planners


def _write_items(fqn: str, piece: TensorParallelPiece) -> list[WriteItem]:
    props = TensorProperties.create_from_tensor(piece.local)
    return [
        WriteItem(
            index=MetadataIndex(fqn, torch.Size(b.offsets)),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)),
                properties=props,
                size=piece.shape,
            ),
        )
        for b in piece.boxes
    ]


class PieceSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, with pieces written as their boxes of the whole tensor."""

    def create_local_plan(self) -> SavePlan:
        pieces = {k: v for k, v in self.state_dict.items() if isinstance(v, TensorParallelPiece)}
        if not pieces:
            return super().create_local_plan()
        rest = {k: v for k, v in self.state_dict.items() if k not in pieces}
        plan = create_default_local_save_plan(rest, self.is_coordinator)
        items = list(plan.items) + [item for k, v in pieces.items() for item in _write_items(k, v)]
        plan = dataclasses.replace(plan, items=items)
        if self.flatten_state_dict:
            plan = dataclasses.replace(plan, planner_data=self.mappings)
        self.plan = plan
        return plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        view = lookup_piece(self.state_dict, index)
        return view.contiguous() if view is not None else super().lookup_object(index)


def load_plan_with_pieces(state_dict: dict[str, Any], metadata: Any, strict: bool):
    """DCP's default local load plan, with pieces read box by box from whatever chunks the checkpoint holds."""
    from torch.distributed.checkpoint.planner import LoadPlan

    pieces = {k: v for k, v in state_dict.items() if isinstance(v, TensorParallelPiece)}
    rest = {k: v for k, v in state_dict.items() if k not in pieces}
    plan = create_default_local_load_plan(rest, metadata, strict)
    items = list(plan.items)
    for fqn, piece in pieces.items():
        md = metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
        if md.size != piece.shape:
            raise ValueError(f"Size mismatch between saved {md.size} and current: {piece.shape} for {fqn}")
        chunks = [ChunkStorageMetadata(torch.Size(b.offsets), torch.Size(b.sizes)) for b in piece.boxes]
        items += create_read_items_for_chunk_list(fqn, md, chunks)
    return LoadPlan(items)


def lookup_piece(state_dict: dict[str, Any], index: MetadataIndex) -> torch.Tensor | None:
    """The local view a read into ``index`` fills, if ``index`` names a piece's box (else None)."""
    obj = state_dict.get(index.fqn)
    if isinstance(obj, TensorParallelPiece):
        return obj.box_tensor(tuple(index.offset))
    return None
