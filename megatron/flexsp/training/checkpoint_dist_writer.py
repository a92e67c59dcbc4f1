"""Writing a ``torch_dist`` checkpoint (layout: ``checkpoint_dist``), in the foreground or in the
background (``--async-save``), with the same on-disk safety rules as the ``torch`` format.

A save has two halves:

1. snapshot (every rank, training blocked): each rank stages a copy of its own shards of the model
   and optimizer (no gather), rank 0 serializes the global states, each rank its own (RNG); NaN/inf
   anywhere refuses the save on every rank; rank 0 makes the hidden directory.
2. write (every rank; inline, or in a background thread over a process group of its own): DCP writes
   every rank's shards, each rank its RNG file, every rank hashes a share of the files, rank 0
   writes trainer.pt and meta.json (sha256 of every file) last and then renames the directory into
   place and switches ``latest`` (``checkpoint_writer._install``); its outcome is relayed to all.

Why a thread and not DCP's ``async_save``: the second half is more than DCP's write (checksums,
meta.json, the atomic install), and it must all happen after the shards are on disk; one thread
running the same function as the synchronous save keeps the two paths one. At most one save is
in flight: a new save first waits for the previous one, so at most one staged copy exists.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint_dist import DIST_DIR, DIST_FORMAT_VERSION, rank_file, stage, write_shards
from .checkpoint_format import (
    ERRORS,
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointError,
    NonFiniteCheckpointError,
    dist_on,
    iter_name,
    model_signature,
    nonfinite_tensors,
    rank,
    sha256,
    world,
)
from .checkpoint_writer import _clean_stale, _fsync_dir, _fsync_file, _install, _retain
from .distributed import broadcast_object
from .error_relay import relay_error
from .state_registry import Scope, StateRegistry, place

__all__ = ["DistSaver"]

log = logging.getLogger("flexsp.checkpoint")


def _to_bytes(obj: Any) -> bytes:
    """Serialized now: the bytes are the snapshot (training may change the live objects meanwhile)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@dataclass
class _Job:
    """One save between its two halves: what was staged and where it goes."""

    iteration: int
    save_dir: Path
    tmp: Path
    final: Path
    shards: dict[str, Any]  # entry name -> this rank's staged sharded state dict
    own: bytes  # this rank's PER_RANK states (rank_NNNNN.pt)
    files: dict[str, bytes] = field(default_factory=dict)  # rank 0: trainer.pt and any full-form entry files
    signature: dict[str, list[int]] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    keep_latest_k: int | None = None
    check_finite: bool = True
    started: float = field(default_factory=time.monotonic)


class DistSaver:
    """Saves ``torch_dist`` checkpoints; with ``async_save`` the write runs in the background.

    ``blocked_s``: how long the last ``save`` kept the caller (training) waiting, the figure
    ``--async-save`` is meant to shrink (benchmarks/checkpoint_bench.py reports it)."""

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = async_save
        self.blocked_s = 0.0
        self._group: Any = None
        self._thread: threading.Thread | None = None
        self._job: _Job | None = None
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- public
    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def save(
        self,
        save_dir: str | os.PathLike,
        iteration: int,
        registry: StateRegistry,
        *,
        args: dict[str, Any] | None = None,
        keep_latest_k: int | None = None,
        check_finite: bool = True,
    ) -> Path:
        """Collective: checkpoint ``iteration``; returns its directory (complete once ``wait`` returns)."""
        t0 = time.perf_counter()
        self.wait()  # the previous save first: one staged copy at a time
        job = self._snapshot(Path(save_dir), iteration, registry)
        job.args, job.keep_latest_k, job.check_finite = dict(args or {}), keep_latest_k, check_finite
        if not self.async_save:
            self._write(job, None)
            self.blocked_s = time.perf_counter() - t0
            return job.final
        group = self.prepare()
        self._job, self._error = job, None
        self._thread = threading.Thread(target=self._run, args=(job, group), name="flexsp-async-save", daemon=True)
        self._thread.start()
        self.blocked_s = time.perf_counter() - t0
        return job.final

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is on disk; raise its error. Returns its directory."""
        if self._thread is None:
            return None
        self._thread.join()
        job, error = self._job, self._error
        self._thread, self._job, self._error = None, None, None
        if error is not None:
            raise error
        assert job is not None
        log.info("saved checkpoint %s (in the background, %.1f s)", job.final, time.monotonic() - job.started)
        return job.final

    def poll(self) -> Path | None:
        """Collective (only while a save is in flight): when every rank's write has finished, finish it
        here (its error raised on every rank at the same iteration); else return None at once."""
        if self._thread is None:
            return None
        done = torch.tensor([0 if self._thread.is_alive() else 1], dtype=torch.int32)
        if dist_on() and world() > 1:
            if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
                done = done.cuda()
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.wait() if int(done.item()) else None

    # -------------------------------------------------------------- snapshot
    def prepare(self) -> Any:
        """Collective (every rank, once; the first asynchronous save calls it otherwise): the gloo group
        of the background write, its own so its collectives never interleave with training's. Made at
        start-up by the trainer so the first save does not pay for it."""
        if not self.async_save or not dist_on() or world() == 1:
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _snapshot(self, save_dir: Path, iteration: int, registry: StateRegistry) -> _Job:
        """Collective on the default group: every registered state staged on its rank (see module doc)."""
        shards: dict[str, Any] = {}
        own: dict[str, Any] = {}
        full: dict[str, Any] = {TRAINER_FILE: {"iteration": iteration}}
        signature: dict[str, list[int]] = {}
        for e in registry:
            if e.scope is Scope.COLLECTIVE and e.sharded is not None:
                sd = e.sharded.state_dict()
                if e.file == MODEL_FILE:
                    signature = model_signature(sd)  # global shapes: a DTensor's shape is the whole tensor's
                shards[e.name] = stage(sd)
                continue
            value = e.state_dict()  # COLLECTIVE without a sharded form: full on rank 0 (the torch format's way)
            if e.scope is Scope.PER_RANK:
                place(own, e.key or (e.name,), value)
            elif rank() == 0:
                if e.key:
                    place(full.setdefault(e.file, {}), e.key, value)
                else:
                    full[e.file] = value
        final = save_dir / iter_name(iteration)
        tmp, error = None, None
        if rank() == 0:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                _clean_stale(save_dir)  # nothing is in flight now: hidden directories are leftovers
                tmp = save_dir / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
                tmp.mkdir()
            except OSError as e:
                error = CheckpointError(f"saving checkpoint {final} failed: {type(e).__name__}: {e}")
        relay_error(error, ERRORS)
        tmp = Path(broadcast_object(str(tmp) if tmp is not None else None))
        files = {name: _to_bytes(content) for name, content in full.items()} if rank() == 0 else {}
        return _Job(iteration, save_dir, tmp, final, shards, _to_bytes(own), files, signature)

    # ----------------------------------------------------------------- write
    def _run(self, job: _Job, group: Any) -> None:
        try:
            self._write(job, group)
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()/poll() on the training thread
            self._error = e

    def _write(self, job: _Job, group: Any) -> None:
        """Collective over ``group``: the second half of a save (module doc); errors raised on every rank."""
        err: str | None = None
        records: dict[str, dict[str, Any]] = {}
        if job.check_finite:  # on the staged copy: in the background too, and nothing is written if it fails
            try:
                _refuse_nonfinite(job.shards, job.final, group)
            except NonFiniteCheckpointError:
                if rank() == 0:
                    shutil.rmtree(job.tmp, ignore_errors=True)
                raise
        try:
            write_shards(job.tmp / DIST_DIR, job.shards, group)
            job.shards = {}  # the staged copy is on disk: let it go before hashing
            own = job.tmp / rank_file(rank())
            own.write_bytes(job.own)
            _fsync_file(own)
            shards = sorted((job.tmp / DIST_DIR).iterdir())
            mine = [own] + [f for i, f in enumerate(shards) if i % world() == rank()]  # hashing, shared out
            for f in mine:
                records[f.relative_to(job.tmp).as_posix()] = {"sha256": sha256(f), "bytes": f.stat().st_size}
        except Exception as e:  # noqa: BLE001 - every rank must learn about it
            err = f"rank {rank()}: {type(e).__name__}: {e}"
        gathered = _gather((records, err), group)
        error: CheckpointError | None = None
        if rank() == 0:
            try:
                _finish_on_rank0(job, gathered)
            except CheckpointError as e:
                error = e
            except Exception as e:  # noqa: BLE001
                error = CheckpointError(f"saving checkpoint {job.final} failed: {type(e).__name__}: {e}")
            if error is not None:
                shutil.rmtree(job.tmp, ignore_errors=True)
        relay_error(error, ERRORS, group=group)


def _gather(value: Any, group: Any) -> list[Any]:
    """Every rank's ``value`` on rank 0 (over ``group``)."""
    if not dist_on() or world() == 1:
        return [value]
    out: list[Any] | None = [None] * world() if rank() == 0 else None
    dist.gather_object(value, out, dst=0, group=group)
    return out or []


def _refuse_nonfinite(shards: dict[str, Any], final: Path, group: Any) -> None:
    """Collective over ``group``: NonFiniteCheckpointError on every rank if any rank's shards hold NaN/inf."""
    bad = [n for name, sd in shards.items() for n in nonfinite_tensors(sd, name)]
    found = [bad]
    if dist_on() and world() > 1:
        found = [None] * world()
        dist.all_gather_object(found, bad, group=group)
    names = sorted({n for b in found for n in (b or [])})
    if names:
        raise NonFiniteCheckpointError(
            f"refusing to save checkpoint {final}: non-finite values (NaN/inf) in "
            f"{', '.join(names[:4])}: not written, `latest` still names the last finite checkpoint"
        )


def _finish_on_rank0(job: _Job, gathered: list[Any]) -> None:
    """Rank 0, after every shard is on disk: trainer.pt, meta.json (last), install, retention."""
    import json

    failed = [e for _, e in gathered if e]
    if failed:
        raise CheckpointError(f"saving checkpoint {job.final} failed: {failed[0]}")
    records: dict[str, Any] = {}
    for r, _ in gathered:
        records.update(r)
    for name, content in job.files.items():
        f = job.tmp / name
        f.write_bytes(content)
        _fsync_file(f)
        records[name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    meta = {
        "format_version": DIST_FORMAT_VERSION,
        "ckpt_format": "torch_dist",
        "iteration": job.iteration,
        "world_size": world(),
        "model_signature": job.signature,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "args": job.args,
        "files": dict(sorted(records.items())),
    }
    (job.tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")  # last: marks complete
    _fsync_file(job.tmp / "meta.json")
    _fsync_dir(job.tmp / DIST_DIR)
    _fsync_dir(job.tmp)
    _install(job.save_dir, job.tmp, job.final)
    _clean_stale(job.save_dir)
    if job.keep_latest_k is not None:
        for p in _retain(job.save_dir, int(job.keep_latest_k)):
            log.info("removed old checkpoint %s (--keep-latest-k %d)", p, job.keep_latest_k)
