"""Checkpoints of every registered resumable state (``state_registry``); verified and atomic on disk.

Layout of ``--save DIR`` (two formats, ``--ckpt-format``; both are loadable, whichever the flag says)::

    DIR/latest                 "iter_0000010" (written atomically: temp file + os.replace)
    DIR/iter_0000010/meta.json human-readable: format, iteration, world size, model signature, args,
                               and the sha256 and size of every other file of the directory
    torch_dist (default, format 3; ``checkpoint_dist``):
    DIR/iter_0000010/dist/     torch.distributed.checkpoint: each rank's own model/optimizer shards + .metadata
    DIR/iter_0000010/trainer.pt iteration and the global states: scheduler, sampler, planner, extra.*
    DIR/iter_0000010/rank_00003.pt rank 3's own states (RNG)
    torch (format 2):
    DIR/iter_0000010/model.pt  full (unsharded) model state dict, gathered to rank 0
    DIR/iter_0000010/optim.pt  full optimizer state dict (keyed by parameter name)
    DIR/iter_0000010/trainer.pt iteration and the other registered states, each at its key:
                               scheduler, sampler, planner, rng (a list by rank), extra.*

Why torch_dist by default: each rank writes only its shards (rank 0 needs no more memory than the
others; the full gather of the torch format made it 1.4-2x), the write can run in the background
(``--async-save``), and DCP reshards on load, so a job that lost a node resumes on fewer ranks.
The torch format stays: one plain file a user can inspect, and the exporters' input.

Safety rules, each for a fault seen on real clusters (see docs/faults.md):

* A checkpoint is written to a hidden temporary directory, synced and renamed into place, and
  only then is ``latest`` switched, so a crash while saving never damages the last good one.
  Re-saving an existing iteration first points ``latest`` at the complete new copy under a
  staging name, so ``latest`` names an existing, complete directory at every moment.
* Every file's sha256 is in meta.json and is checked on load. When the checkpoint ``latest``
  names is damaged or unreadable, the newest older one that verifies is loaded instead, with a
  warning naming both (rank 0 decides, every rank follows).
* Everything is loaded with ``torch.load(weights_only=True)`` and an explicit allow-list: a
  checkpoint directory from someone else cannot run code.
* A model or optimizer state with a NaN/inf is never written (NonFiniteCheckpointError).
* ``keep_latest_k`` deletes all but the newest k checkpoints (never the one ``latest`` names).
* Loading checks the model signature (parameter names and shapes), and optionally that the
  global batch size and LR schedule did not change (``check_resume_compatible``), and stops with
  a one-line error on every rank. Another world size is allowed: model and optimizer reshard, the
  global states (data position, planner) continue, per-rank RNG stays seeded (a warning).
* torch_dist: every shard file has its sha256 (hashed by all ranks, a share each); DCP's pickled
  metadata is read through an allow-list; ``--async-save`` installs a checkpoint only after every
  rank's shards are written, so a kill during the background write leaves ``latest`` as it was.

This module is the front door: the layout and rules above, and ``save_checkpoint`` /
``load_checkpoint`` for a model, optimizer and scheduler plus plain states. The work is done by
``checkpoint_format`` (names, checksums, safe unpickling), ``checkpoint_writer`` (writing) and
``checkpoint_loader`` (choosing and loading), over a ``StateRegistry``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint_dist import DIST_DIR, read_full_entry
from .checkpoint_dist_writer import DistSaver
from .checkpoint_format import (
    CKPT_FORMATS,
    FORMAT_VERSION,
    MODEL_FILE,
    READABLE_VERSIONS,
    CheckpointError,
    NonFiniteCheckpointError,
    ResumeMismatchError,
    UnsafeCheckpointError,
    ckpt_format,
    find_checkpoint,
    list_checkpoints,
    model_signature,
    nonfinite_tensors,
    read_meta,
    safe_globals,
    torch_load,
    verify_checkpoint,
)
from .checkpoint_loader import LR_SCHEDULE_ARGS, LoadedCheckpoint, check_resume_compatible, load_state, newest_verified
from .checkpoint_writer import save_state
from .core_state import register_core
from .rng_state import rng_state, set_rng_state
from .state_registry import StateRegistry, ValueBox

__all__ = [
    "FORMAT_VERSION",
    "LR_SCHEDULE_ARGS",
    "READABLE_VERSIONS",
    "CKPT_FORMATS",
    "CheckpointError",
    "DistSaver",
    "LoadedCheckpoint",
    "NonFiniteCheckpointError",
    "ResumeMismatchError",
    "UnsafeCheckpointError",
    "check_resume_compatible",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state",
    "model_signature",
    "nonfinite_tensors",
    "read_meta",
    "read_model_state",
    "rng_state",
    "safe_globals",
    "save_checkpoint",
    "save_state",
    "set_rng_state",
    "verify_checkpoint",
]


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
    *,
    states: Mapping[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    keep_latest_k: int | None = None,
    check_finite: bool = True,
    ckpt_format: str = "torch",
) -> Path:
    """Write model, optimizer, scheduler, RNG and the plain ``states`` (name -> value, each at
    trainer.pt[name]) as the checkpoint of ``iteration`` (collective); see ``save_state``.

    ``ckpt_format``: "torch" (full state dicts written by rank 0; one process writes a model-only
    checkpoint with ``optimizer=None``) or "torch_dist" (every rank its own shards, ``checkpoint_dist``)."""
    if ckpt_format not in CKPT_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {ckpt_format!r} (choose from {', '.join(CKPT_FORMATS)})")
    registry = register_core(StateRegistry(), model, optimizer, scheduler)
    for name, value in (states or {}).items():
        box = ValueBox(value)
        registry.register(name, box.state_dict, box.load_state_dict)
    if ckpt_format == "torch_dist":
        saver = DistSaver()
        return saver.save(
            save_dir, iteration, registry, args=args, keep_latest_k=keep_latest_k, check_finite=check_finite
        )
    return save_state(save_dir, iteration, registry, args=args, keep_latest_k=keep_latest_k, check_finite=check_finite)


def load_checkpoint(
    load_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
    *,
    states: Sequence[str] = ("sampler", "planner", "extra"),
    load_step: int | None = None,
    args: Mapping[str, Any] | Any | None = None,
    override_opt_param_scheduler: bool = False,
) -> LoadedCheckpoint:
    """Restore model, optimizer, scheduler and RNG (collective); the plain ``states`` it held are in
    ``LoadedCheckpoint.states``. See ``load_state``."""
    registry = register_core(StateRegistry(), model, optimizer, scheduler)
    for name in states:
        box = ValueBox()
        registry.register(name, box.state_dict, box.load_state_dict)
    return load_state(
        load_dir, registry, load_step=load_step, args=args, override_opt_param_scheduler=override_opt_param_scheduler
    )


def read_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model state dict (CPU tensors) and meta.json of a checkpoint, in this one process.

    Why: exporters (flexsp-convert flexsp-to-hf) and tools read weights without a process group or a
    model. ``path`` is a checkpoint directory or a ``--save`` directory (then the newest checkpoint
    that verifies, as a resume would choose); every file is checked against its sha256 first."""
    ckpt_dir, meta = newest_verified(path)
    if ckpt_format(meta) == "torch_dist":
        return read_full_entry(ckpt_dir / DIST_DIR, "model"), meta
    state = torch_load(ckpt_dir / MODEL_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MODEL_FILE} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, meta
