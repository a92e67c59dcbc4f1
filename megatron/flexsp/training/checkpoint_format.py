"""The checkpoint format: names, files, checksums, safe unpickling; what reading and writing share.

Why apart: the writer (``checkpoint_writer``) and the loader (``checkpoint_loader``) must agree on
the layout (see ``checkpointing``'s docstring) and on what makes a directory a complete, intact
checkpoint; both read that from here and from nowhere else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint_tp import TensorParallelPiece

__all__ = [
    "CKPT_FORMATS",
    "FORMAT_VERSION",
    "LATEST",
    "MODEL_FILE",
    "OPTIM_FILE",
    "READABLE_VERSIONS",
    "TRAINER_FILE",
    "CheckpointError",
    "NonFiniteCheckpointError",
    "ResumeMismatchError",
    "UnsafeCheckpointError",
    "ckpt_format",
    "find_checkpoint",
    "list_checkpoints",
    "model_signature",
    "nonfinite_tensors",
    "read_meta",
    "safe_globals",
    "verify_checkpoint",
]

log = logging.getLogger("flexsp.checkpoint")

LATEST = "latest"
MODEL_FILE, OPTIM_FILE, TRAINER_FILE = "model.pt", "optim.pt", "trainer.pt"
FORMAT_VERSION = 2  # the ``torch`` format (full state dicts on rank 0); ``torch_dist`` writes 3
READABLE_VERSIONS = (1, 2, 3)  # 1: before checksums (loaded unverified, with a note); 3: torch_dist (DCP shards)
CKPT_FORMATS = ("torch", "torch_dist")
ITER_RE = re.compile(r"^iter_(\d+)$")
ITER_PREFIX_RE = re.compile(r"^iter_(\d+)")
STAGED = ".staged-"  # iter_0000010.staged-<nonce>: the complete new copy while an iteration is re-saved
HIDDEN_PREFIXES = (".tmp-", ".trash-", ".old-", ".link-")  # never named by `latest`: garbage after a crash
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not match this run; the message says how."""


class NonFiniteCheckpointError(CheckpointError):
    """Refused to save: a model or optimizer-state tensor holds NaN or inf (it would poison every resume)."""


class UnsafeCheckpointError(CheckpointError):
    """Refused to load: a file references a Python global outside the allow-list (could run code)."""


class ResumeMismatchError(CheckpointError):
    """The checkpoint was saved with settings this run cannot continue exactly (batch size, LR schedule)."""


#: every error class a rank may relay to the others (CheckpointError first: the default)
ERRORS: tuple[type[CheckpointError], ...] = (
    CheckpointError,
    NonFiniteCheckpointError,
    UnsafeCheckpointError,
    ResumeMismatchError,
)


def ckpt_format(meta: dict[str, Any]) -> str:
    """ "torch" or "torch_dist": how the checkpoint of ``meta`` holds its model and optimizer."""
    return "torch_dist" if meta.get("format_version") == 3 else "torch"


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world() -> int:
    return dist.get_world_size() if dist_on() else 1


def state_dict_options(load: bool = False):
    """Full (unsharded) state dicts: gathered to rank 0 on save, broadcast from it on load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist_on() and world() > 1)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_signature(state: dict[str, Any]) -> dict[str, list[int]]:
    """Parameter/buffer names and shapes: what must match for a checkpoint to fit a model."""
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, (torch.Tensor, TensorParallelPiece))}


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_latest(save_dir: Path) -> str | None:
    try:
        name = (save_dir / LATEST).read_text().strip()
    except OSError:
        return None
    return name or None


# ------------------------------------------------------------------------------ safe loading


@functools.lru_cache(maxsize=1)
def _safe_globals() -> tuple[Any, ...]:
    return tuple(safe_globals())


def safe_globals() -> list[Any]:
    """The allow-list for ``torch.load(weights_only=True)``: numpy arrays (the numpy RNG state)
    and megatron-core's own list (megatron/core/safe_globals.py) where this version has one.

    Why explicit: weights_only refuses every other global, so a pickle reducer such as
    ``os.system`` in a checkpoint from someone else is refused instead of run."""
    out: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    out.append(_reconstruct)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes by class
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    try:
        from megatron.core.safe_globals import (
            SAFE_GLOBALS as _MCORE,  # megatron-core >= 0.13
        )

        out += [g for g in _MCORE if g not in out]
    except Exception as e:  # noqa: BLE001 - older megatron-core, or its imports fail on this host
        log.debug("megatron.core.safe_globals not used: %s", e)
    return out


def torch_load(path: Path) -> Any:
    """weights_only load with the allow-list; an unsafe global becomes UnsafeCheckpointError."""
    try:
        with torch.serialization.safe_globals(list(_safe_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", str(e))
        what = m.group(1) if m else str(e).splitlines()[0][:200]
        raise UnsafeCheckpointError(
            f"checkpoint file {path} refused: it references {what}, which is not on the allow-list of safe types "
            "(torch.load weights_only=True); a checkpoint must hold only tensors and plain data - do not load files "
            "from an untrusted source"
        ) from None


# ------------------------------------------------------------------------------ finiteness


def nonfinite_tensors(state: Any, prefix: str = "", limit: int = 4) -> list[str]:
    """Names of floating-point tensors in a (nested) state dict holding NaN or inf, at most ``limit``.

    Why: the last line of defence before a checkpoint is written; one poisoned checkpoint makes
    every auto-resume crash again."""
    found: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(obj, (torch.Tensor, TensorParallelPiece)):
            t = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor's or a piece's own data
            if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
                found.append(name or "<tensor>")
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")
        elif isinstance(obj, float) and not math.isfinite(obj):
            found.append(name)

    walk(state, prefix)
    return found


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, directory) of every complete checkpoint named ``iter_N`` in ``save_dir``, oldest first."""
    d = Path(save_dir)
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = ITER_RE.match(p.name)
            if m and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_checkpoint(load_dir: str | os.PathLike, *, load_step: int | None = None) -> Path:
    """The checkpoint directory ``--load`` names: DIR/iter_<load_step> if given, else DIR/latest's target,
    or DIR itself if it is one. Only resolves names; ``verify_checkpoint`` checks the contents."""
    p = Path(load_dir)
    if not p.exists():
        raise CheckpointError(f"--load {p}: directory does not exist")
    if load_step is not None:
        target = p / iter_name(int(load_step))
        if not (target / "meta.json").exists():
            have = [i for i, _ in list_checkpoints(p)]
            raise CheckpointError(
                f"--load {p} --load-step {load_step}: no complete checkpoint {target.name} "
                f"(available iterations: {have or 'none'})"
            )
        return target
    if (p / "meta.json").exists():
        return p
    if not (p / LATEST).exists():
        raise CheckpointError(f"--load {p}: no checkpoint there (no '{LATEST}' file and no meta.json)")
    name = read_latest(p) or ""
    target = p / name
    if not name or not (target / "meta.json").exists():
        raise CheckpointError(f"--load {p}: '{LATEST}' names {name or 'nothing'}, which is missing or incomplete")
    return target


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """meta.json of checkpoint directory ``path`` (CheckpointError if unreadable)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: meta.json is not an object")
    return meta


def is_shard(name: str) -> bool:
    """A torch_dist shard file (``dist/__<rank>_<n>.distcp``): verified by all ranks on load, a share each."""
    return name.startswith("dist/") and name.endswith(".distcp")


def verify_file(path: Path, name: str, rec: dict[str, Any]) -> str | None:
    """Why file ``name`` of checkpoint ``path`` does not match its meta.json record, or None."""
    f = path / name
    if not f.is_file():
        return f"checkpoint {path}: {name} is missing"
    size = f.stat().st_size
    if size != rec.get("bytes"):
        return f"checkpoint {path}: {name} has {size} bytes, meta.json says {rec.get('bytes')} (truncated or replaced)"
    if sha256(f) != rec.get("sha256"):
        return f"checkpoint {path}: {name} fails its sha256 check (corrupted on disk)"
    return None


def verify_checkpoint(path: str | os.PathLike, meta: dict[str, Any] | None = None, *, shards: bool = True) -> list[str]:
    """Check every file against the sha256 and size in meta.json; raise CheckpointError naming the first bad one.

    ``shards=False`` leaves the torch_dist shard files out (a collective load checks them on all ranks).
    Returns notes (e.g. a format-1 checkpoint has no checksums and is accepted unverified)."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path}: format version {version} (this code reads {READABLE_VERSIONS})")
    files = meta.get("files")
    if version == 1 or files is None:
        return [f"checkpoint {path} has no checksums (format {version}): loaded unverified"]
    must = ("trainer.pt", "dist/.metadata") if version == 3 else ("model.pt", "trainer.pt")
    if not isinstance(files, dict) or any(m not in files for m in must):
        raise CheckpointError(f"checkpoint {path}: meta.json lists no {'/'.join(must)} checksums")
    for name, rec in sorted(files.items()):
        if not shards and is_shard(name):
            continue
        err = verify_file(path, name, rec)
        if err:
            raise CheckpointError(err)
    return []
