"""Checkpoints: model, optimizer, scheduler, data position, RNG and planner state; verified and atomic on disk.

Layout of ``--save DIR``::

    DIR/latest                 "iter_0000010" (written atomically: temp file + os.replace)
    DIR/iter_0000010/meta.json human-readable: iteration, world size, model signature, args,
                               and the sha256 and size of every other file of the directory
    DIR/iter_0000010/model.pt  full (unsharded) model state dict
    DIR/iter_0000010/optim.pt  full optimizer state dict (keyed by parameter name)
    DIR/iter_0000010/trainer.pt scheduler, sampler, planner, per-rank RNG states, extra

Why full state dicts (gathered to rank 0 by torch.distributed.checkpoint.state_dict) rather than
sharded DCP files: they work identically on gloo and NCCL, for FSDP2 and replicated models, and
give one plain file a user can inspect.

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
* Loading checks the world size and the model signature (parameter names and shapes), and
  optionally that the global batch size and LR schedule did not change
  (``check_resume_compatible``), and stops with a one-line error on every rank.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import broadcast_object

__all__ = [
    "LR_SCHEDULE_ARGS",
    "CheckpointError",
    "LoadedCheckpoint",
    "NonFiniteCheckpointError",
    "ResumeMismatchError",
    "UnsafeCheckpointError",
    "check_resume_compatible",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "model_signature",
    "nonfinite_tensors",
    "read_meta",
    "rng_state",
    "safe_globals",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

log = logging.getLogger("flexsp.checkpoint")

LATEST = "latest"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before checksums (loaded unverified, with a note)
_ITER_RE = re.compile(r"^iter_(\d+)$")
_ITER_PREFIX_RE = re.compile(r"^iter_(\d+)")
_STAGED = ".staged-"  # iter_0000010.staged-<nonce>: the complete new copy while an iteration is re-saved
_HIDDEN_PREFIXES = (".tmp-", ".trash-", ".old-", ".link-")  # never named by `latest`: garbage after a crash
_HASH_CHUNK = 8 << 20

#: Arguments that define the LR schedule: a change is refused on resume unless
#: override_opt_param_scheduler (Megatron's --override-opt-param-scheduler).
LR_SCHEDULE_ARGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not match this run; the message says how."""


class NonFiniteCheckpointError(CheckpointError):
    """Refused to save: a model or optimizer-state tensor holds NaN or inf (it would poison every resume)."""


class UnsafeCheckpointError(CheckpointError):
    """Refused to load: a file references a Python global outside the allow-list (could run code)."""


class ResumeMismatchError(CheckpointError):
    """The checkpoint was saved with settings this run cannot continue exactly (batch size, LR schedule)."""


class _Damaged(Exception):
    """Internal: one candidate checkpoint failed verification (the loader tries an older one)."""


@dataclass
class LoadedCheckpoint:
    iteration: int
    path: Path
    sampler: dict[str, Any] | None
    planner: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)  # the args record saved with the checkpoint
    fallback_from: Path | None = None  # the checkpoint `latest` named, when it failed verification
    warnings: list[str] = field(default_factory=list)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _options(load: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=_dist() and _world() > 1)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_signature(state: dict[str, Any]) -> dict[str, list[int]]:
    """Parameter/buffer names and shapes: what must match for a checkpoint to fit a model."""
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


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


def _torch_load(path: Path) -> Any:
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
        if isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
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


# ------------------------------------------------------------------------------ resume checks


def _as_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    return dict(vars(args))


def check_resume_compatible(
    saved_args: Mapping[str, Any] | Any, args: Mapping[str, Any] | Any, *, override_opt_param_scheduler: bool = False
) -> None:
    """Refuse, with one line, a resume that cannot continue the saved run exactly.

    * ``global_batch_size`` changed: refused (the data order and the sampler position are per
      global batch; Megatron's consumed-samples resume would silently change the batches).
    * LR schedule (``LR_SCHEDULE_ARGS``) changed: refused unless ``override_opt_param_scheduler``
      (Megatron's --override-opt-param-scheduler), which takes this run's values.
    Keys missing on either side (older checkpoints) are not compared."""
    saved, now = _as_dict(saved_args), _as_dict(args)

    def differs(key: str) -> bool:
        if key not in saved or key not in now or saved[key] is None and now[key] is None:
            return False
        a, b = saved[key], now[key]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        return a != b

    if differs("global_batch_size"):
        raise ResumeMismatchError(
            f"the checkpoint was saved with --global-batch-size {saved['global_batch_size']}, this run has "
            f"{now['global_batch_size']}: resuming with another global batch size is not supported (the data order "
            "is per global batch); resume with the saved value"
        )
    changed = [k for k in LR_SCHEDULE_ARGS if differs(k)]
    if changed and not override_opt_param_scheduler:
        what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed)
        raise ResumeMismatchError(
            f"the LR schedule differs from the checkpoint's ({what}; --lr-decay-iters defaults to --train-iters): "
            "pass --override-opt-param-scheduler to use this run's values, or resume with the saved ones"
        )


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_latest(save_dir: Path) -> str | None:
    try:
        name = (save_dir / LATEST).read_text().strip()
    except OSError:
        return None
    return name or None


def _link_copy(src: Path, dst: Path) -> None:
    """Complete copy of checkpoint directory ``src`` at ``dst`` (hard links: no data copied; a plain
    copy where the file system has no hard links), via a hidden name and one rename."""
    tmp = dst.with_name(f".link-{dst.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    for f in sorted(src.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
            _fsync_file(tmp / f.name)
    _fsync_dir(tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory: first renamed to a hidden trash name (one atomic step, so a kill
    mid-delete never leaves a half-deleted directory under a checkpoint's name), then removed."""
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale(save_dir: Path) -> None:
    """Remove what a killed save left behind; never what ``latest`` names."""
    keep = _read_latest(save_dir)
    for p in save_dir.iterdir():
        if p.name == keep:
            continue
        stale = p.name.startswith(_HIDDEN_PREFIXES) or (_ITER_PREFIX_RE.match(p.name) and _STAGED in p.name)
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, directory) of every complete checkpoint named ``iter_N`` in ``save_dir``, oldest first."""
    d = Path(save_dir)
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = _ITER_RE.match(p.name)
            if m and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def _retain(save_dir: Path, keep_latest_k: int) -> list[Path]:
    """Delete all but the newest ``keep_latest_k`` checkpoints; the one ``latest`` names always stays."""
    latest = _read_latest(save_dir)
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
    staged = final.with_name(f"{final.name}{_STAGED}{os.getpid()}-{time.time_ns()}")
    os.replace(tmp, staged)
    _fsync_dir(save_dir)
    _write_atomic_text(save_dir / LATEST, staged.name + "\n")
    trash = final.with_name(f".trash-{final.name}-{time.time_ns()}")
    os.replace(final, trash)
    _link_copy(staged, final)
    _write_atomic_text(save_dir / LATEST, final.name + "\n")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def _write_files(
    tmp: Path, iteration: int, model_sd: dict, optim_sd: dict | None, trainer: dict, args: dict[str, Any] | None
) -> None:
    """The files of one checkpoint into ``tmp``, synced, with meta.json (sha256 of each) written last."""
    torch.save(model_sd, tmp / "model.pt")
    if optim_sd is not None:
        torch.save(optim_sd, tmp / "optim.pt")
    torch.save(trainer, tmp / "trainer.pt")
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync_file(f)
        files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    meta = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "world_size": _world(),
        "model_signature": model_signature(model_sd),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "args": args or {},
        "files": files,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")  # last: marks complete
    _fsync_file(tmp / "meta.json")
    _fsync_dir(tmp)


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
    *,
    sampler_state: dict[str, Any] | None = None,
    planner_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    keep_latest_k: int | None = None,
    check_finite: bool = True,
) -> Path:
    """Write the checkpoint of ``iteration`` (collective: every rank calls it). Returns its directory.

    ``keep_latest_k``: afterwards delete all but the newest k checkpoints (None keeps all).
    ``check_finite``: refuse (NonFiniteCheckpointError, nothing written) if a model or optimizer
    state tensor holds NaN/inf. Errors are raised on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if keep_latest_k is not None and int(keep_latest_k) < 1:
        raise CheckpointError(f"keep_latest_k must be >= 1, got {keep_latest_k}")
    save_dir = Path(save_dir)
    model_sd = get_model_state_dict(model, options=_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_options()) if optimizer is not None else None
    rngs = _gather_rng()
    final = save_dir / _iter_name(iteration)
    err, err_type, tmp = None, "CheckpointError", None
    if _rank() == 0:
        try:
            bad = (
                nonfinite_tensors(model_sd, "model") + nonfinite_tensors(optim_sd, "optimizer") if check_finite else []
            )
            if bad:
                err_type = "NonFiniteCheckpointError"
                raise NonFiniteCheckpointError(
                    f"non-finite values (NaN/inf) in {', '.join(bad[:4])}: not written, `latest` still names the "
                    "last finite checkpoint"
                )
            save_dir.mkdir(parents=True, exist_ok=True)
            _clean_stale(save_dir)
            tmp = save_dir / f".tmp-{_iter_name(iteration)}-{os.getpid()}-{time.time_ns()}"
            tmp.mkdir()
            trainer = {
                "iteration": iteration,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "sampler": sampler_state,
                "planner": planner_state,
                "rng": rngs,
                "extra": extra or {},
            }
            _write_files(tmp, iteration, model_sd, optim_sd, trainer, args)
            _install(save_dir, tmp, final)
            tmp = None
            _clean_stale(save_dir)  # what a killed earlier save left that `latest` named until now
            if keep_latest_k is not None:
                for p in _retain(save_dir, int(keep_latest_k)):
                    log.info("removed old checkpoint %s (--keep-latest-k %d)", p, keep_latest_k)
        except Exception as e:  # noqa: BLE001 - every rank must learn about it
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            err = (
                str(e)
                if isinstance(e, NonFiniteCheckpointError)
                else f"saving checkpoint {final} failed: {type(e).__name__}: {e}"
            )
            if isinstance(e, NonFiniteCheckpointError):
                err = f"refusing to save checkpoint {final}: {err}"
    err, err_type = broadcast_object((err, err_type))
    if err:
        raise (NonFiniteCheckpointError if err_type == "NonFiniteCheckpointError" else CheckpointError)(err)
    return final


# ------------------------------------------------------------------------------ finding and verifying


def find_checkpoint(load_dir: str | os.PathLike, *, load_step: int | None = None) -> Path:
    """The checkpoint directory ``--load`` names: DIR/iter_<load_step> if given, else DIR/latest's target,
    or DIR itself if it is one. Only resolves names; ``verify_checkpoint`` checks the contents."""
    p = Path(load_dir)
    if not p.exists():
        raise CheckpointError(f"--load {p}: directory does not exist")
    if load_step is not None:
        target = p / _iter_name(int(load_step))
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
    name = _read_latest(p) or ""
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


def verify_checkpoint(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[str]:
    """Check every file against the sha256 and size in meta.json; raise CheckpointError naming the first bad one.

    Returns notes (e.g. a format-1 checkpoint has no checksums and is accepted unverified)."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path}: format version {version} (this code reads {READABLE_VERSIONS})")
    files = meta.get("files")
    if version == 1 or files is None:
        return [f"checkpoint {path} has no checksums (format {version}): loaded unverified"]
    if not isinstance(files, dict) or "model.pt" not in files or "trainer.pt" not in files:
        raise CheckpointError(f"checkpoint {path}: meta.json lists no model.pt/trainer.pt checksums")
    for name, rec in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            raise CheckpointError(
                f"checkpoint {path}: {name} has {size} bytes, meta.json says {rec.get('bytes')} (truncated or replaced)"
            )
        if _sha256(f) != rec.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check (corrupted on disk)")
    return []


def _check(meta: dict[str, Any], model_sig: dict[str, list[int]], path: Path) -> str | None:
    if meta.get("format_version") not in READABLE_VERSIONS:
        return f"checkpoint {path}: format version {meta.get('format_version')} (this code reads {FORMAT_VERSION})"
    if meta.get("world_size") != _world():
        return (
            f"checkpoint {path} was written by {meta.get('world_size')} ranks; this run has {_world()} "
            "(the data position, RNG and plans are per world size: resume with the same number of ranks)"
        )
    saved = meta.get("model_signature", {})
    if saved != model_sig:
        missing = sorted(set(model_sig) - set(saved))
        unexpected = sorted(set(saved) - set(model_sig))
        shapes = [
            f"{k}: checkpoint {saved[k]} vs model {model_sig[k]}"
            for k in sorted(set(saved) & set(model_sig))
            if saved[k] != model_sig[k]
        ]
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"missing in checkpoint {missing[:4]}")
        if unexpected:
            parts.append(f"not in model {unexpected[:4]}")
        return f"checkpoint {path} does not fit this model (different --num-layers/--hidden-size/...?): " + ", ".join(
            parts
        )
    return None


def _candidates(load_dir: Path, load_step: int | None) -> tuple[Path | None, list[Path], str | None]:
    """(first choice, older fallbacks newest first, why the first choice is unusable or None).

    Fallbacks exist only for the ``latest`` case: an explicit --load-step or checkpoint directory is
    loaded as named or not at all. Fallbacks are never newer than the one ``latest`` names (a newer
    one belongs to an abandoned timeline, e.g. after a --load-step rewind)."""
    if load_step is not None or (load_dir / "meta.json").exists():
        return find_checkpoint(load_dir, load_step=load_step), [], None
    first, why = None, None
    try:
        first = find_checkpoint(load_dir)
    except CheckpointError as e:
        if not (load_dir / LATEST).exists() or not list_checkpoints(load_dir):
            raise
        why = str(e)
    name = first.name if first is not None else (_read_latest(load_dir) or "")
    m = _ITER_PREFIX_RE.match(name)
    bound = int(m.group(1)) if m else None
    older = [p for i, p in reversed(list_checkpoints(load_dir)) if p != first and (bound is None or i <= bound)]
    return first, older, why


def _load_candidate(
    path: Path, sig: dict[str, list[int]], need_optim: bool, args: Any, override_opt_param_scheduler: bool
) -> tuple[dict, Any, dict, dict, list[str]]:
    """Everything of one checkpoint, verified. _Damaged: try an older one; CheckpointError: stop."""
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        raise _Damaged(str(e)) from None
    err = _check(meta, sig, path)
    if err:
        raise CheckpointError(err)
    if args is not None:
        check_resume_compatible(meta.get("args") or {}, args, override_opt_param_scheduler=override_opt_param_scheduler)
    try:
        notes = verify_checkpoint(path, meta)
    except CheckpointError as e:
        raise _Damaged(str(e)) from None
    if need_optim and not (path / "optim.pt").exists():
        raise CheckpointError(f"checkpoint {path} has no optimizer state (optim.pt)")
    try:
        model_sd = _torch_load(path / "model.pt")
        trainer = _torch_load(path / "trainer.pt")
        optim_sd = _torch_load(path / "optim.pt") if need_optim else {}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable although (maybe) verified: a damaged file
        raise _Damaged(f"checkpoint {path}: cannot read: {type(e).__name__}: {e}") from None
    if not isinstance(trainer, dict) or "iteration" not in trainer:
        raise _Damaged(f"checkpoint {path}: trainer.pt holds no iteration")
    return meta, trainer, model_sd, optim_sd, notes


def _select_and_read(
    load_dir: Path,
    load_step: int | None,
    sig: dict[str, list[int]],
    need_optim: bool,
    args: Any,
    override_opt_param_scheduler: bool,
) -> tuple[tuple, dict, dict, dict]:
    """Rank 0: the newest checkpoint that verifies (or exactly ``load_step``), read.

    Returns ((path, saved args, the checkpoint that failed or None, warnings), trainer, model, optim).
    """
    first, older, why = _candidates(load_dir, load_step)
    failures: list[tuple[Path | None, str]] = [] if why is None else [(first, why)]
    tried = ([first] if first is not None and why is None else []) + older
    for path in tried:
        try:
            meta, trainer, model_sd, optim_sd, notes = _load_candidate(
                path, sig, need_optim, args, override_opt_param_scheduler
            )
        except _Damaged as e:
            failures.append((path, str(e)))
            if load_step is not None or not older:
                raise CheckpointError(str(e)) from None
            continue
        warns = list(notes)
        if failures:
            bad, reason = failures[0]
            warns.insert(
                0,
                f"checkpoint {bad if bad is not None else load_dir / LATEST} failed verification ({reason}); "
                f"falling back to {path}, the newest checkpoint that verifies",
            )
        info = (str(path), meta.get("args") or {}, str(failures[0][0]) if failures else None, warns)
        return info, trainer, model_sd, optim_sd
    raise CheckpointError(f"--load {load_dir}: no checkpoint verifies: " + "; ".join(r for _, r in failures))


def load_checkpoint(
    load_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
    load_step: int | None = None,
    args: Mapping[str, Any] | Any | None = None,
    override_opt_param_scheduler: bool = False,
) -> LoadedCheckpoint:
    """Restore everything ``save_checkpoint`` wrote (collective). Errors are raised on every rank.

    The checkpoint ``latest`` names is verified (sha256 of every file); if it is damaged or
    unreadable the newest older checkpoint that verifies is loaded, with a warning naming both
    (``LoadedCheckpoint.fallback_from``). ``load_step`` loads iteration N exactly (no fallback).
    With ``args`` (this run's arguments), ``check_resume_compatible`` runs against the saved ones
    before any tensor is loaded."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # the model's own signature, from its full state dict (same collective on every rank)
    sig = model_signature(get_model_state_dict(model, options=_options()))
    sig = broadcast_object(sig if _rank() == 0 else None)
    err, err_type, info, trainer, model_sd, optim_sd = None, "CheckpointError", None, None, {}, {}
    if _rank() == 0:
        try:
            info, trainer, model_sd, optim_sd = _select_and_read(
                Path(load_dir), load_step, sig, optimizer is not None, args, override_opt_param_scheduler
            )
        except CheckpointError as e:
            err, err_type = str(e), type(e).__name__
        except Exception as e:  # noqa: BLE001 - a damaged file: tell every rank
            err = f"--load {load_dir}: cannot read checkpoint: {type(e).__name__}: {e}"
    err, err_type = broadcast_object((err, err_type))
    if err:
        cls = {c.__name__: c for c in (UnsafeCheckpointError, ResumeMismatchError)}.get(err_type, CheckpointError)
        raise cls(err)
    info = broadcast_object(info)
    for w in info[3]:
        log.warning("%s", w)
    set_model_state_dict(model, model_sd, options=_options(load=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=_options(load=True))
    small = broadcast_object(dict(trainer) if _rank() == 0 else None)
    if scheduler is not None and small.get("scheduler") is not None:
        scheduler.load_state_dict(small["scheduler"])
    rngs = small.get("rng") or []
    if restore_rng and len(rngs) == _world():
        set_rng_state(rngs[_rank()])
    return LoadedCheckpoint(
        iteration=int(small["iteration"]),
        path=Path(info[0]),
        sampler=small.get("sampler"),
        planner=small.get("planner"),
        extra=small.get("extra") or {},
        args=dict(info[1]),
        fallback_from=Path(info[2]) if info[2] else None,
        warnings=list(info[3]),
    )
