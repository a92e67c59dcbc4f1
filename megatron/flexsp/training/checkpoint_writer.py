"""Writing a checkpoint: every registered state into a hidden directory, synced, then renamed
into place and named by ``latest``; older ones retired by ``keep_latest_k``.

Why apart from loading: the write path's rules (a kill at any instant leaves ``latest`` naming a
complete checkpoint; NaN/inf is never written) are independent of how a checkpoint is chosen and
read back, and each is easier to check alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint_format import (
    ERRORS,
    FORMAT_VERSION,
    HIDDEN_PREFIXES,
    ITER_PREFIX_RE,
    LATEST,
    MODEL_FILE,
    STAGED,
    TRAINER_FILE,
    CheckpointError,
    NonFiniteCheckpointError,
    dist_on,
    iter_name,
    list_checkpoints,
    model_signature,
    nonfinite_tensors,
    rank,
    read_latest,
    sha256,
    world,
)
from .error_relay import relay_error
from .state_registry import Scope, StateRegistry, place

__all__ = ["save_state"]

log = logging.getLogger("flexsp.checkpoint")


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


def _link_copy(src: Path, dst: Path) -> None:
    """Complete copy of checkpoint directory ``src`` at ``dst`` (hard links: no data copied; a plain
    copy where the file system has no hard links), via a hidden name and one rename."""
    tmp = dst.with_name(f".link-{dst.name}-{os.getpid()}-{time.time_ns()}")
    _link_tree(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` made with hard links to every file under ``src`` (subdirectories too: the torch_dist
    format's shard directory), copies where links are not possible."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_dir():
            _link_tree(f, dst / f.name)
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
            _fsync_file(dst / f.name)
    _fsync_dir(dst)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory: first renamed to a hidden trash name (one atomic step, so a kill
    mid-delete never leaves a half-deleted directory under a checkpoint's name), then removed."""
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale(save_dir: Path) -> None:
    """Remove what a killed save left behind; never what ``latest`` names."""
    keep = read_latest(save_dir)
    for p in save_dir.iterdir():
        if p.name == keep:
            continue
        stale = p.name.startswith(HIDDEN_PREFIXES) or (ITER_PREFIX_RE.match(p.name) and STAGED in p.name)
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _retain(save_dir: Path, keep_latest_k: int) -> list[Path]:
    """Delete all but the newest ``keep_latest_k`` checkpoints; the one ``latest`` names always stays."""
    latest = read_latest(save_dir)
    ckpts = list_checkpoints(save_dir)
    keep = {p for _, p in ckpts[-keep_latest_k:]} if keep_latest_k > 0 else set()
    removed = []
    for _, p in ckpts:
        if p not in keep and p.name != latest:
            _remove_dir(p)
            removed.append(p)
    if removed:
        _fsync_dir(save_dir)
    return removed


def _install(save_dir: Path, tmp: Path, final: Path) -> None:
    """Move the complete checkpoint ``tmp`` to ``final`` and point ``latest`` at it.

    Invariant: at every instant (a kill may come between any two steps) ``latest`` names an existing,
    complete checkpoint directory, or the previous value it had. Re-saving an existing iteration::

        tmp -> final.staged-x;  latest := final.staged-x;  final -> trash;
        link-copy staged -> final;  latest := final;  remove staged, trash
    """
    if not final.exists():
        os.replace(tmp, final)
        _fsync_dir(save_dir)
        _write_atomic_text(save_dir / LATEST, final.name + "\n")
        return
    staged = final.with_name(f"{final.name}{STAGED}{os.getpid()}-{time.time_ns()}")
    os.replace(tmp, staged)
    _fsync_dir(save_dir)
    _write_atomic_text(save_dir / LATEST, staged.name + "\n")
    trash = final.with_name(f".trash-{final.name}-{time.time_ns()}")
    os.replace(final, trash)
    _link_copy(staged, final)
    _write_atomic_text(save_dir / LATEST, final.name + "\n")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def _write_files(tmp: Path, iteration: int, files: dict[str, Any], args: dict[str, Any] | None) -> None:
    """The files of one checkpoint into ``tmp``, synced, with meta.json (sha256 of each) written last."""
    for name, content in files.items():
        torch.save(content, tmp / name)
    records = {}
    for f in sorted(tmp.iterdir()):
        _fsync_file(f)
        records[f.name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    meta = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "world_size": world(),
        "model_signature": model_signature(files.get(MODEL_FILE) or {}),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "args": args or {},
        "files": records,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")  # last: marks complete
    _fsync_file(tmp / "meta.json")
    _fsync_dir(tmp)


# ------------------------------------------------------------------------------ saving


def _gather(value: Any) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None elsewhere)."""
    if not dist_on() or world() == 1:
        return [value]
    out: list[Any] | None = [None] * world() if rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def snapshot(registry: StateRegistry, iteration: int) -> dict[str, Any]:
    """Collective: file name -> content of every registered state (complete on rank 0, empty elsewhere)."""
    files: dict[str, Any] = {TRAINER_FILE: {"iteration": iteration}}
    for e in registry:
        value = e.state_dict()
        if e.scope is Scope.PER_RANK:
            value = _gather(value)
        if rank() != 0:
            continue
        if e.key:
            place(files.setdefault(e.file, {}), e.key, value)
        else:
            files[e.file] = value
    return files if rank() == 0 else {}


def _refuse_nonfinite(files: dict[str, Any], registry: StateRegistry) -> None:
    """NonFiniteCheckpointError naming the first NaN/inf tensors of the model and optimizer files."""
    bad = []
    for name, content in files.items():
        owner = registry.by_file(name)
        if name != TRAINER_FILE and owner is not None:
            bad += nonfinite_tensors(content, owner.name)
    if bad:
        raise NonFiniteCheckpointError(
            f"non-finite values (NaN/inf) in {', '.join(bad[:4])}: not written, `latest` still names the "
            "last finite checkpoint"
        )


def _write_checkpoint(
    save_dir: Path, final: Path, files: dict[str, Any], args: dict[str, Any] | None, keep_latest_k: int | None
) -> None:
    """Rank 0: write ``files`` to a hidden directory, install it as ``final``, retire old ones."""
    save_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(save_dir)
    tmp = save_dir / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        _write_files(tmp, int(files[TRAINER_FILE]["iteration"]), files, args)
        _install(save_dir, tmp, final)
    except Exception:  # a kill runs no cleanup: the next save removes the hidden directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _clean_stale(save_dir)  # what a killed earlier save left that `latest` named until now
    if keep_latest_k is not None:
        for p in _retain(save_dir, int(keep_latest_k)):
            log.info("removed old checkpoint %s (--keep-latest-k %d)", p, keep_latest_k)


def save_state(
    save_dir: str | os.PathLike,
    iteration: int,
    registry: StateRegistry,
    *,
    args: dict[str, Any] | None = None,
    keep_latest_k: int | None = None,
    check_finite: bool = True,
) -> Path:
    """Write the checkpoint of ``iteration`` with every state of ``registry`` (collective). Returns its directory.

    ``keep_latest_k``: afterwards delete all but the newest k checkpoints (None keeps all).
    ``check_finite``: refuse (NonFiniteCheckpointError, nothing written) if a model or optimizer
    state tensor holds NaN/inf. Errors are raised on every rank."""
    if keep_latest_k is not None and int(keep_latest_k) < 1:
        raise CheckpointError(f"keep_latest_k must be >= 1, got {keep_latest_k}")
    save_dir = Path(save_dir)
    files = snapshot(registry, iteration)
    final = save_dir / iter_name(iteration)
    error: CheckpointError | None = None
    if rank() == 0:
        try:
            if check_finite:
                _refuse_nonfinite(files, registry)
            _write_checkpoint(save_dir, final, files, args, keep_latest_k)
        except NonFiniteCheckpointError as e:
            error = NonFiniteCheckpointError(f"refusing to save checkpoint {final}: {e}")
        except Exception as e:  # noqa: BLE001 - every rank must learn about it
            error = CheckpointError(f"saving checkpoint {final} failed: {type(e).__name__}: {e}")
    relay_error(error, ERRORS)
    return final
