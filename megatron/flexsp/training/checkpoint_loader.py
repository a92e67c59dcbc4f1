"""Choosing and loading a checkpoint: the newest one that verifies, checked against this run, then
every registered state restored.

Why apart from writing: which checkpoint to trust (``latest``, else the newest older one that
verifies; exactly ``--load-step`` when given) and whether this run can continue it (world size,
model shape, batch size, LR schedule) are decided on rank 0 before any tensor moves; that policy
is this module's one job, besides handing each registry entry its state.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .checkpoint_dist import DIST_DIR, load_shards, rank_file, saved_entries
from .checkpoint_format import (
    ERRORS,
    ITER_PREFIX_RE,
    LATEST,
    MODEL_FILE,
    READABLE_VERSIONS,
    TRAINER_FILE,
    CheckpointError,
    ResumeMismatchError,
    ckpt_format,
    dist_on,
    find_checkpoint,
    is_shard,
    list_checkpoints,
    model_signature,
    rank,
    read_latest,
    read_meta,
    torch_load,
    verify_checkpoint,
    verify_file,
    world,
)
from .distributed import broadcast_object
from .error_relay import relay_error
from .state_registry import Scope, StateRegistry, lookup

__all__ = ["LR_SCHEDULE_ARGS", "LoadedCheckpoint", "check_resume_compatible", "load_state", "newest_verified"]

log = logging.getLogger("flexsp.checkpoint")

#: Arguments that define the LR schedule: a change is refused on resume unless
#: override_opt_param_scheduler (Megatron's --override-opt-param-scheduler).
LR_SCHEDULE_ARGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style")


class _Damaged(Exception):
    """Internal: one candidate checkpoint failed verification (the loader tries an older one)."""


@dataclass
class _Request:
    """What rank 0 needs to choose a checkpoint: where, which, and what this run must match."""

    load_dir: Path
    load_step: int | None
    sig: dict[str, list[int]]
    needed: dict[str, str]  # file -> the state it holds, besides trainer.pt
    args: Any
    override_opt_param_scheduler: bool
    model_only: bool = False  # --finetune: the weights alone, on any world size
    sharded: frozenset[str] = frozenset()  # entries with a sharded form (read from DCP shards in torch_dist)


@dataclass
class LoadedCheckpoint:
    """What was resumed: the iteration, from where, and every registered state it held (by name)."""

    iteration: int
    path: Path
    states: dict[str, Any] = field(default_factory=dict)  # non-collective entries' loaded states
    args: dict[str, Any] = field(default_factory=dict)  # the args record saved with the checkpoint
    fallback_from: Path | None = None  # the checkpoint `latest` named, when it failed verification
    warnings: list[str] = field(default_factory=list)


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
    Keys missing on either side (older checkpoints) are not compared. Another world size is not
    refused (in either format: model and optimizer reshard, see ``world_size_note``)."""
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


def _signature_hint(saved: dict[str, list[int]], model_sig: dict[str, list[int]]) -> str:
    """The flag that most likely explains a model-signature mismatch (issue 18 changed two defaults)."""
    out, emb = "output_layer.weight", "embedding.word_embeddings.weight"
    if (out in saved) != (out in model_sig):
        return (
            "tied vs untied output layer: the checkpoint is "
            + ("untied, add --untie-embeddings-and-output-weights" if out in saved else "tied, drop it")
            + " (embeddings and output layer are tied by default, as in Megatron)"
        )
    if emb in saved and emb in model_sig and saved[emb][1:] == model_sig[emb][1:] and saved[emb] != model_sig[emb]:
        return (
            f"embedding table of {saved[emb][0]} rows vs {model_sig[emb][0]}: set --make-vocab-size-divisible-by "
            "(default 128) or --vocab-size to the checkpoint's table"
        )
    return "different --num-layers/--hidden-size/...?"


def _check(meta: dict[str, Any], model_sig: dict[str, list[int]], path: Path) -> str | None:
    """Why this run cannot load the checkpoint of ``meta``, or None. Another world size is no reason:
    both formats reshard model and optimizer (``world_size_note``)."""
    if meta.get("format_version") not in READABLE_VERSIONS:
        return f"checkpoint {path}: format version {meta.get('format_version')} (this code reads {READABLE_VERSIONS})"
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
        return f"checkpoint {path} does not fit this model ({_signature_hint(saved, model_sig)}): " + ", ".join(parts)
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
    name = first.name if first is not None else (read_latest(load_dir) or "")
    m = ITER_PREFIX_RE.match(name)
    bound = int(m.group(1)) if m else None
    older = [p for i, p in reversed(list_checkpoints(load_dir)) if p != first and (bound is None or i <= bound)]
    return first, older, why


def _read_files(path: Path, req: _Request, fmt: str) -> dict[str, Any]:
    """file -> content of trainer.pt and the files ``req.needed`` (file -> the state it holds); in the
    torch_dist format the sharded entries stay in their DCP shards (only their presence is checked)."""
    needed = req.needed
    if fmt == "torch_dist":
        needed = {f: what for f, what in needed.items() if what not in req.sharded}
        try:
            have = saved_entries(path / DIST_DIR)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - verified, yet unreadable: damaged
            raise _Damaged(f"checkpoint {path}: cannot read its DCP metadata: {type(e).__name__}: {e}") from None
        for what in sorted(req.sharded - have):
            raise CheckpointError(f"checkpoint {path} has no {what} state (not among its DCP shards)")
    for name, what in needed.items():
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path} has no {what} state ({name})")
    try:
        contents = {name: torch_load(path / name) for name in [TRAINER_FILE, *needed]}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable although (maybe) verified: a damaged file
        raise _Damaged(f"checkpoint {path}: cannot read: {type(e).__name__}: {e}") from None
    trainer = contents[TRAINER_FILE]
    if not isinstance(trainer, dict) or "iteration" not in trainer:
        raise _Damaged(f"checkpoint {path}: trainer.pt holds no iteration")
    return contents


def _load_candidate(path: Path, req: _Request) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(meta, file contents, notes) of one checkpoint, verified. _Damaged: try an older one; CheckpointError: stop."""
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        raise _Damaged(str(e)) from None
    err = _check(meta, req.sig, path)
    if err:
        raise CheckpointError(err)
    if req.args is not None:
        check_resume_compatible(
            meta.get("args") or {}, req.args, override_opt_param_scheduler=req.override_opt_param_scheduler
        )
    try:
        notes = verify_checkpoint(path, meta, shards=False)  # the shard files: every rank a share (_shard_verdict)
    except CheckpointError as e:
        raise _Damaged(str(e)) from None
    return meta, _read_files(path, req, ckpt_format(meta)), notes


def _fallback_warning(failures: list[tuple[Path | None, str]], load_dir: Path, path: Path) -> str:
    bad, reason = failures[0]
    return (
        f"checkpoint {bad if bad is not None else load_dir / LATEST} failed verification ({reason}); "
        f"falling back to {path}, the newest checkpoint that verifies"
    )


def _proposals(req: _Request) -> Generator[tuple[Path, dict[str, Any]], str | None, tuple[tuple, dict[str, Any]]]:
    """Rank 0: the newest checkpoint that verifies (or exactly ``load_step``), read.

    Yields each candidate that verifies except for its shard files, (path, meta), and is sent back
    the shard verdict (None: intact); returns ((path, saved args, the checkpoint that failed or None,
    warnings, world size, format), file contents) of the one chosen."""
    first, older, why = _candidates(req.load_dir, req.load_step)
    failures: list[tuple[Path | None, str]] = [] if why is None else [(first, why)]
    tried = ([first] if first is not None and why is None else []) + older
    for path in tried:
        try:
            meta, contents, notes = _load_candidate(path, req)
            bad_shard = yield path, meta
            if bad_shard:
                raise _Damaged(bad_shard)
        except _Damaged as e:
            failures.append((path, str(e)))
            if req.load_step is not None or not older:
                raise CheckpointError(str(e)) from None
            continue
        warns = ([_fallback_warning(failures, req.load_dir, path)] if failures else []) + list(notes)
        world_size, fmt = meta.get("world_size"), ckpt_format(meta)
        info = (str(path), meta.get("args") or {}, str(failures[0][0]) if failures else None, warns, world_size, fmt)
        return info, contents
    raise CheckpointError(f"--load {req.load_dir}: no checkpoint verifies: " + "; ".join(r for _, r in failures))


def _shard_verdict(path: Path, shards: dict[str, Any]) -> str | None:
    """Collective: the shard files of ``path`` checked against their records, a share on each rank (at
    scale one rank hashing every shard would take minutes); the first failure, or None."""
    names = sorted(shards)
    mine = [n for i, n in enumerate(names) if i % world() == rank()]
    bad = next((err for n in mine if (err := verify_file(path, n, shards[n]))), None)
    found = [bad]
    if dist_on() and world() > 1:
        found = [None] * world()
        dist.all_gather_object(found, bad)
    return next((b for b in found if b), None)


def _read_on_rank0(req: _Request) -> tuple[tuple, dict[str, Any]]:
    """Collective: rank 0 chooses and reads, every rank checks a share of the chosen one's shard files;
    an error (rank 0's or a shard's, after the fallbacks) is raised on every rank."""
    chooser = _proposals(req) if rank() == 0 else None
    verdict: str | None = None
    started = False
    while True:
        step, error, contents = None, None, {}
        if chooser is not None:
            try:
                path, meta = chooser.send(verdict) if started else next(chooser)
                step = ("check", str(path), {n: r for n, r in (meta.get("files") or {}).items() if is_shard(n)})
            except StopIteration as stop:
                info, contents = stop.value
                step = ("done", info, None)
            except CheckpointError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - a damaged file: tell every rank
                error = CheckpointError(f"--load {req.load_dir}: cannot read checkpoint: {type(e).__name__}: {e}")
            started = True
        relay_error(error, ERRORS)
        kind, what, shards = broadcast_object(step)
        if kind == "done":
            return what, contents
        verdict = _shard_verdict(Path(what), shards)


def _sharded_templates(registry: StateRegistry, path: Path) -> dict[str, Any]:
    """Collective (torch_dist): every sharded entry's state as this rank holds it, filled in place from
    the checkpoint's DCP shards (DCP reads each rank's slices, whatever world size wrote them)."""
    templates = {e.name: e.sharded.state_dict() for e in registry if e.sharded is not None}
    if templates:
        load_shards(path / DIST_DIR, templates)
    return templates


def _own_states(path: Path, fmt: str, saved_world: int | None) -> Any:
    """torch_dist: this rank's own file (its RNG), where the world size is the saved one; else None."""
    if fmt != "torch_dist" or saved_world != world():
        return None
    return torch_load(path / rank_file(rank()))


def _restore(registry: StateRegistry, contents: dict[str, Any], info: tuple) -> tuple[int, dict[str, Any]]:
    """Collective: hand every entry its state, in registration order; (iteration, loaded small states)."""
    path, saved_world, fmt = Path(info[0]), info[4], info[5]
    small = None
    if rank() == 0:
        small = {e.name: lookup(contents.get(e.file), e.key) for e in registry if e.scope is not Scope.COLLECTIVE}
        small["iteration"] = int(contents[TRAINER_FILE]["iteration"])
    small = broadcast_object(small)
    sharded = _sharded_templates(registry, path) if fmt == "torch_dist" else {}
    own = _own_states(path, fmt, saved_world)
    states: dict[str, Any] = {}
    for e in registry:
        if e.name in sharded:
            e.sharded.load_state_dict(sharded.pop(e.name))
            continue
        if e.scope is Scope.COLLECTIVE:  # present on rank 0 (its file was required and read)
            e.load_state_dict(lookup(contents[e.file], e.key) if rank() == 0 else None)
            continue
        value = small[e.name]
        if e.scope is Scope.PER_RANK and fmt == "torch_dist":
            value = lookup(own, e.key or (e.name,)) if own is not None else None
        elif e.scope is Scope.PER_RANK:  # another world size: not restored (world_size_note warns)
            value = value[rank()] if isinstance(value, list) and len(value) == world() else None
        if value is not None:  # None: a checkpoint from before this entry existed; keep the fresh state
            e.load_state_dict(value)
            states[e.name] = value
    return int(small["iteration"]), states


def load_state(
    load_dir: str | os.PathLike,
    registry: StateRegistry,
    *,
    load_step: int | None = None,
    args: Mapping[str, Any] | Any | None = None,
    override_opt_param_scheduler: bool = False,
    model_only: bool = False,
) -> LoadedCheckpoint:
    """Restore every state of ``registry`` from a checkpoint (collective). Errors are raised on every rank.

    The checkpoint ``latest`` names is verified (sha256 of every file); if it is damaged or
    unreadable the newest older checkpoint that verifies is loaded, with a warning naming both
    (``LoadedCheckpoint.fallback_from``). ``load_step`` loads iteration N exactly (no fallback).
    With ``args`` (this run's arguments), ``check_resume_compatible`` runs against the saved ones
    before any tensor is loaded. The registry must hold the model (its signature is checked).
    ``model_only`` (--finetune): restore the model entry alone, from a checkpoint of any world
    size and run settings (``args`` is not compared); a model-only checkpoint is enough."""
    model = registry.by_file(MODEL_FILE)
    if model is None:
        raise ValueError("load_state: the registry has no model entry (model.pt)")
    if model_only:
        registry = registry.only(model.name)
        args = None
    # global shapes from the shards where the model has them (no gather); else the full state (a collective)
    sig = model_signature(model.sharded.state_dict() if model.sharded is not None else model.state_dict())
    needed = {f: e.name for f in registry.files() if (e := registry.by_file(f)) is not None}
    req = _Request(
        Path(load_dir),
        load_step,
        broadcast_object(sig if rank() == 0 else None),
        needed,
        args,
        override_opt_param_scheduler,
        model_only,
        frozenset(e.name for e in registry if e.sharded is not None),
    )
    info, contents = _read_on_rank0(req)
    note = world_size_note(Path(info[0]), info[4], model_only=model_only)
    for w in info[3] + ([note] if note else []):
        log.warning("%s", w)
    iteration, states = _restore(registry, contents, info)
    return LoadedCheckpoint(
        iteration=iteration,
        path=Path(info[0]),
        states=states,
        args=dict(info[1]),
        fallback_from=Path(info[2]) if info[2] else None,
        warnings=list(info[3]) + ([note] if note else []),
    )


def newest_verified(load_dir: str | os.PathLike, *, load_step: int | None = None) -> tuple[Path, dict[str, Any]]:
    """(directory, meta) of the checkpoint ``load_dir`` names that verifies (one process, no model needed).

    The same choice as ``load_state``: ``latest`` (or ``load_dir`` itself, or exactly ``load_step``),
    else the newest older checkpoint that verifies, with a warning naming both."""
    first, older, why = _candidates(Path(load_dir), load_step)
    failures: list[str] = [] if why is None else [why]
    for path in ([first] if first is not None and why is None else []) + older:
        try:
            meta = read_meta(path)
            for note in verify_checkpoint(path, meta):
                log.warning("%s", note)
        except CheckpointError as e:
            failures.append(str(e))
            if load_step is not None or not older:
                raise
            continue
        if failures:
            log.warning("%s; falling back to %s, the newest checkpoint that verifies", failures[0], path)
        return path, meta
    raise CheckpointError(f"--load {load_dir}: no checkpoint verifies: " + "; ".join(failures))


def world_size_note(path: Path, saved_world: int | None, *, model_only: bool = False) -> str | None:
    """The warning for a checkpoint of another world size (None when it matches or only weights load).

    Why a warning and not a refusal: model and optimizer are resharded (DCP's load plans for
    torch_dist, full state dicts broadcast from rank 0 for torch); the sampler position, planner,
    scheduler and calibration describe the global batch stream, which does not depend on the number
    of ranks, so the resumed run sees the same batches. Only per-rank RNG cannot map onto other ranks."""
    if model_only or saved_world is None or saved_world == world():
        return None
    return (
        f"checkpoint {path} was written by {saved_world} ranks; this run has {world()}: model and optimizer "
        "are resharded and the data position and planner are global (same batches), but per-rank RNG "
        "cannot be mapped: every rank keeps its generators as seeded from --seed"
    )
