"""Checkpoints: model, optimizer, scheduler, data position, RNG and planner state; atomic on disk.

Layout of ``--save DIR``::

    DIR/latest                 "iter_0000010" (written atomically: temp file + os.replace)
    DIR/iter_0000010/meta.json human-readable: iteration, world size, model signature, args
    DIR/iter_0000010/model.pt  full (unsharded) model state dict
    DIR/iter_0000010/optim.pt  full optimizer state dict (keyed by parameter name)
    DIR/iter_0000010/trainer.pt scheduler, sampler, planner, per-rank RNG states, extra

Why full state dicts (gathered to rank 0 by torch.distributed.checkpoint.state_dict) rather than
sharded DCP files: they work identically on gloo and NCCL, for FSDP2 and replicated models, and
give one plain file a user can inspect. A checkpoint is written to a temporary directory, synced
and renamed into place, and only then is ``latest`` switched, so a crash while saving never
damages the last good checkpoint. Loading checks the world size and the model signature
(parameter names and shapes) first and stops with a clear error on any mismatch, on every rank.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "model_signature", "rng_state", "set_rng_state"]

LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not match this run; the message says how."""


@dataclass
class LoadedCheckpoint:
    iteration: int
    path: Path
    sampler: dict[str, Any] | None
    planner: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _bcast(obj: Any) -> Any:
    if not _dist() or _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _options(load: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=_dist() and _world() > 1)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_signature(state: dict[str, Any]) -> dict[str, list[int]]:
    """Parameter/buffer names and shapes: what must match for a checkpoint to fit a model."""
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------ RNG

def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _gather_rng() -> list[dict[str, Any]] | None:
    mine = rng_state()
    if not _dist() or _world() == 1:
        return [mine]
    out: list[Any] | None = [None] * _world() if _rank() == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


# ------------------------------------------------------------------------------ files

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any = None, *,
                    sampler_state: dict[str, Any] | None = None, planner_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, args: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``iteration`` (collective: every rank calls it). Returns its directory."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    save_dir = Path(save_dir)
    model_sd = get_model_state_dict(model, options=_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_options()) if optimizer is not None else None
    rngs = _gather_rng()
    final = save_dir / _iter_name(iteration)
    err, tmp = None, None
    if _rank() == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob(".tmp-iter_*"):  # left by a crash while saving: never pointed to
                shutil.rmtree(stale, ignore_errors=True)
            tmp = save_dir / f".tmp-{_iter_name(iteration)}-{os.getpid()}-{time.time_ns()}"
            tmp.mkdir()
            meta = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "world_size": _world(),
                "model_signature": model_signature(model_sd),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "torch": torch.__version__,
                "args": args or {},
            }
            torch.save(model_sd, tmp / "model.pt")
            if optim_sd is not None:
                torch.save(optim_sd, tmp / "optim.pt")
            torch.save({
                "iteration": iteration,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "sampler": sampler_state,
                "planner": planner_state,
                "rng": rngs,
                "extra": extra or {},
            }, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            # Swap into place. If a checkpoint of this iteration exists (a rerun), move it aside
            # first; `latest` never points at a half-written directory.
            old = None
            if final.exists():
                old = save_dir / f".old-{final.name}-{time.time_ns()}"
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(save_dir)
            _write_atomic_text(save_dir / LATEST, final.name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - every rank must learn about it
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            err = f"saving checkpoint {final} failed: {type(e).__name__}: {e}"
    err = _bcast(err)
    if err:
        raise CheckpointError(err)
    return final


def find_checkpoint(load_dir: str | os.PathLike) -> Path:
    """The checkpoint directory ``--load`` names: DIR/latest's target, or DIR itself if it is one."""
    p = Path(load_dir)
    if not p.exists():
        raise CheckpointError(f"--load {p}: directory does not exist")
    if (p / "meta.json").exists():
        return p
    latest = p / LATEST
    if not latest.exists():
        raise CheckpointError(f"--load {p}: no checkpoint there (no '{LATEST}' file and no meta.json)")
    name = latest.read_text().strip()
    target = p / name
    if not (target / "meta.json").exists():
        raise CheckpointError(f"--load {p}: '{LATEST}' names {name}, which is missing or incomplete")
    return target


def _check(meta: dict[str, Any], model_sig: dict[str, list[int]], path: Path) -> str | None:
    if meta.get("format_version") != FORMAT_VERSION:
        return f"checkpoint {path}: format version {meta.get('format_version')} (this code reads {FORMAT_VERSION})"
    if meta.get("world_size") != _world():
        return (f"checkpoint {path} was written by {meta.get('world_size')} ranks; this run has {_world()} "
                "(the data position, RNG and plans are per world size: resume with the same number of ranks)")
    saved = meta.get("model_signature", {})
    if saved != model_sig:
        missing = sorted(set(model_sig) - set(saved))
        unexpected = sorted(set(saved) - set(model_sig))
        shapes = [f"{k}: checkpoint {saved[k]} vs model {model_sig[k]}" for k in sorted(set(saved) & set(model_sig))
                  if saved[k] != model_sig[k]]
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"missing in checkpoint {missing[:4]}")
        if unexpected:
            parts.append(f"not in model {unexpected[:4]}")
        return f"checkpoint {path} does not fit this model (different --num-layers/--hidden-size/...?): " + \
            ", ".join(parts)
    return None


def load_checkpoint(load_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any = None, *, restore_rng: bool = True) -> LoadedCheckpoint:
    """Restore everything ``save_checkpoint`` wrote (collective). Errors are raised on every rank."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, set_model_state_dict,
                                                          set_optimizer_state_dict)

    # the model's own signature, from its full state dict (same collective on every rank)
    sig = model_signature(get_model_state_dict(model, options=_options()))
    sig = _bcast(sig if _rank() == 0 else None)
    err, path, trainer, model_sd, optim_sd = None, None, None, {}, {}
    if _rank() == 0:
        try:
            path = find_checkpoint(load_dir)
            meta = json.loads((path / "meta.json").read_text())
            err = _check(meta, sig, path)
            if err is None:
                model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
                trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
                if optimizer is not None:
                    if not (path / "optim.pt").exists():
                        err = f"checkpoint {path} has no optimizer state (optim.pt)"
                    else:
                        optim_sd = torch.load(path / "optim.pt", map_location="cpu", weights_only=False)
        except CheckpointError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - a damaged file: tell every rank
            err = f"--load {load_dir}: cannot read checkpoint: {type(e).__name__}: {e}"
    err = _bcast(err)
    if err:
        raise CheckpointError(err)
    set_model_state_dict(model, model_sd, options=_options(load=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=_options(load=True))
    small = _bcast({k: v for k, v in trainer.items()} if _rank() == 0 else None)
    path = _bcast(str(path) if _rank() == 0 else None)
    if scheduler is not None and small.get("scheduler") is not None:
        scheduler.load_state_dict(small["scheduler"])
    rngs = small.get("rng") or []
    if restore_rng and len(rngs) == _world():
        set_rng_state(rngs[_rank()])
    return LoadedCheckpoint(iteration=int(small["iteration"]), path=Path(path), sampler=small.get("sampler"),
                            planner=small.get("planner"), extra=small.get("extra") or {})
