"""The ``torch_dist`` checkpoint format: every rank writes and reads its own shards through
torch.distributed.checkpoint (DCP), resharded on load to any world size.

Layout of one checkpoint directory (beside ``checkpointing``'s atomic rename, ``latest`` and
meta.json, which are the same for both formats)::

    iter_0000010/meta.json      format 3, ckpt_format "torch_dist", sha256 and size of every file below
    iter_0000010/trainer.pt     the iteration and the global states (scheduler, sampler, planner, extra.*)
    iter_0000010/rank_00003.pt  rank 3's own states (RNG), written by rank 3
    iter_0000010/dist/          DCP: ``__<rank>_<n>.distcp`` shards written by each rank, and ``.metadata``

Why DCP: each rank writes only its FSDP2 shards (no full gather on rank 0, so rank 0 needs no
more memory than the others), and DCP's load plans read each rank's slice of every tensor from
whichever files hold it, which is what resuming on another number of ranks needs.

Safe loading: DCP unpickles ``.metadata`` with plain pickle and non-tensor entries with
``torch.load(weights_only=False)``; here the first goes through an unpickler that admits only
DCP's metadata classes and torch's dtypes/sizes, the second through the checkpoint allow-list.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from .checkpoint_format import CheckpointError, UnsafeCheckpointError, safe_globals
from .checkpoint_tp import PieceSavePlanner, TensorParallelPiece, has_pieces, load_plan_with_pieces, lookup_piece

__all__ = [
    "DIST_DIR",
    "DIST_FORMAT_VERSION",
    "load_shards",
    "rank_file",
    "read_full_entry",
    "saved_entries",
    "stage",
    "write_shards",
]

DIST_DIR = "dist"
DIST_FORMAT_VERSION = 3
METADATA = ".metadata"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def stage(tree: Any) -> Any:
    """A copy of every tensor of ``tree`` (DTensors stay DTensors: a local copy, no communication).

    Why: an asynchronous save writes while training goes on, and the optimizer updates parameters
    and its state in place; the staged copy is what the write sees."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    def copy(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):  # host copy of the local shard; mesh and placements say where it belongs
            local = t.to_local().detach().to("cpu", copy=True)
            return DTensor.from_local(
                local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        return t.detach().to("cpu", copy=True)

    def walk(obj: Any) -> Any:  # pieces (TP partitions as boxes of the whole tensor) copy their local tensor
        if isinstance(obj, TensorParallelPiece):
            return obj.staged()
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        return tree_map_only(torch.Tensor, copy, obj)

    return walk(tree)


# ------------------------------------------------------------------------------ safe reading


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes and torch's dtypes, layouts and sizes; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise UnsafeCheckpointError(
            f"DCP metadata refused: it references {module}.{name}, which is not a checkpoint metadata type "
            "- do not load files from an untrusted source"
        )


_PLAIN = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),  # DCP records the directory it wrote to (StorageMeta.checkpoint_id)
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled with the allow-list above."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (the optimizer's param_groups) read with ``weights_only=True`` and the allow-list;
    tensor-parallel pieces (``checkpoint_tp``) read box by box."""

    pieces = False  # whether the state holds pieces, decided once in set_up_planner

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        self.pieces = has_pieces(state_dict)
        if not self.pieces:
            return super().set_up_planner(state_dict, metadata, is_coordinator)
        # DCP's own set-up first re-creates meta-device tensors and drops every leaf type it does not
        # know (a piece would become None); nothing here is on the meta device, so only flatten.
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        self.original_state_dict = state_dict
        self.state_dict, self.mappings = flatten_state_dict(state_dict)
        self.metadata, self.is_coordinator = metadata, is_coordinator
        return None

    def create_local_plan(self):
        if not self.pieces:
            return super().create_local_plan()
        return load_plan_with_pieces(self.state_dict, self.metadata, not self.allow_partial_load)

    def lookup_tensor(self, index) -> torch.Tensor:
        view = lookup_piece(self.state_dict, index)
        return view if view is not None else super().lookup_tensor(index)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # the helper DCP's own planner uses

        with torch.serialization.safe_globals(safe_globals()):
            obj = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _metadata(dist_dir: Path):
    reader = SafeReader(str(dist_dir))
    return reader, reader.read_metadata()


def saved_entries(dist_dir: Path) -> set[str]:
    """The registry entries (top-level keys) a DCP directory holds."""
    _, md = _metadata(dist_dir)
    return {k.split(".", 1)[0] for k in md.state_dict_metadata}


# ------------------------------------------------------------------------------ writing, reading


def write_shards(dist_dir: Path, state: dict[str, Any], group: Any = None) -> None:
    """Collective over ``group``: every rank writes its shards of ``state`` (entry name -> state dict)."""
    import torch.distributed.checkpoint as dcp

    writer = FileSystemWriter(str(dist_dir), sync_files=True)
    planner = PieceSavePlanner()  # TP partitions as boxes of the whole tensors (checkpoint_tp)
    dcp.save(state, storage_writer=writer, planner=planner, process_group=group, no_dist=not on())  # no_dist: 1 process


def load_shards(dist_dir: Path, state: dict[str, Any], group: Any = None) -> None:
    """Collective: fill ``state`` (entry name -> this rank's sharded state dict, the template) in place
    from the checkpoint, whatever number of ranks wrote it."""
    import torch.distributed.checkpoint as dcp

    try:
        reader, planner = SafeReader(str(dist_dir)), SafeLoadPlanner()
        dcp.load(state, storage_reader=reader, planner=planner, process_group=group, no_dist=not on())
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps each rank's failure; one line for the user
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {dist_dir.parent}: reading the sharded states failed: {type(e).__name__}: "
            f"{first[-1] if first else ''}"
        ) from None


def read_full_entry(dist_dir: Path, name: str) -> dict[str, Any]:
    """Entry ``name`` (e.g. "model") whole, in this one process (no process group): every tensor
    allocated from DCP's metadata and read from every rank's shards."""
    import torch.distributed.checkpoint as dcp

    _, md = _metadata(dist_dir)
    prefix = name + "."
    template: dict[str, Any] = {}
    for key, item in md.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        if isinstance(item, TensorStorageMetadata):
            template[key[len(prefix) :]] = torch.empty(item.size, dtype=item.properties.dtype)
        elif not isinstance(item, BytesStorageMetadata):  # pragma: no cover - a future DCP entry type
            raise CheckpointError(f"checkpoint {dist_dir.parent}: {key} has an unknown DCP entry type")
    if not template:
        raise CheckpointError(f"checkpoint {dist_dir.parent} holds no {name} state")
    state = {name: template}
    dcp.load(state, storage_reader=SafeReader(str(dist_dir)), planner=SafeLoadPlanner(), no_dist=True)
    return state[name]


def on() -> bool:
    return dist.is_available() and dist.is_initialized()
