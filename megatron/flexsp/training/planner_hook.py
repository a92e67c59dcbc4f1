"""The planner hook: plans of upcoming global batches, computed ahead on rank 0, broadcast to all.

Rank 0 owns a background process (multiprocessing, spawn context: the planner never needs
torch or CUDA state) that plans global batch k+1..k+N while batch k trains; it only needs the
batch lengths (``sampler.batch_lengths(k)``, no token reads). When iteration k starts, rank 0
takes plan k if ready, waits for it at most the planner's time limit, and otherwise plans with
the fast fallback (greedy for FlexSP, the baseline itself otherwise). A planner error never
stops training: it is logged and the fallback is used. Rank 0 then broadcasts the plan, so it is
the single source of truth and every rank runs the same schedule.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.plan import Plan, PlanError

__all__ = ["PlanInfo", "PlannerHook", "plan_inline", "broadcast_plan"]

log = logging.getLogger("flexsp.planner_hook")

LengthsFn = Callable[[int], Sequence[int]]


@dataclass
class PlanInfo:
    """How the plan of one iteration was obtained (logged and checkpointed as counters)."""

    iteration: int
    source: str  # "planner" (background), "inline", "fallback-late", "fallback-error"
    solve_time_s: float = 0.0
    wait_ms: float = 0.0
    error: str | None = None


def _planner_config(cfg_dict: dict[str, Any]):
    from megatron.flexsp.planner.api import PlannerConfig

    return PlannerConfig(**cfg_dict)


def plan_inline(lengths: Sequence[int], cost: CostModel, cfg_dict: dict[str, Any], *, fallback: bool = False) -> Plan:
    """Plan one global batch in this process (the planner proper, or its fast fallback)."""
    from megatron.flexsp.planner import api

    cfg = _planner_config(cfg_dict)
    lengths = [int(x) for x in lengths]
    if fallback:
        return api.fallback_plan(lengths, cost, cfg)
    return api.plan_global_batch(lengths, cost, cfg)


def _resolve(planner_fn: str | None) -> Callable[..., Plan]:
    """``module:function`` with plan_inline's signature (a custom planner), default plan_inline."""
    if not planner_fn:
        return plan_inline
    import importlib

    mod, _, name = planner_fn.partition(":")
    return getattr(importlib.import_module(mod), name)


def _worker_main(req_q, res_q, cost_dict: dict[str, Any], cfg_dict: dict[str, Any], needed_from,
                 planner_fn: str | None = None) -> None:
    """Background planner: (k, lengths) in, (k, plan dict | None, solve s, error) out; skips stale k."""
    try:
        os.nice(10)  # the planner must not steal the trainer's CPU time on shared hosts
    except (OSError, AttributeError):
        pass
    cost = CostModel.from_dict(cost_dict)
    plan_fn = _resolve(planner_fn)
    parent = os.getppid()
    res_q.put(("ready", None, 0.0, None))
    while True:
        try:
            item = req_q.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the trainer died (killed): do not linger as an orphan
                return
            continue
        if item is None:
            return
        k, lengths = item
        if k < needed_from.value:  # the trainer already moved past it (fallback used)
            continue
        t0 = time.perf_counter()
        try:
            plan = plan_fn(lengths, cost, cfg_dict)
            res_q.put((k, plan.to_dict(), time.perf_counter() - t0, None))
        except BaseException as e:  # noqa: BLE001 - reported to the trainer, which falls back
            res_q.put((k, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def broadcast_plan(payload: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s payload on every rank (no-op without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return payload
    box = [payload if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


@dataclass
class _Counters:
    planner: int = 0
    inline: int = 0
    fallback_late: int = 0
    fallback_error: int = 0
    solve_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PlannerHook:
    """Gives every rank the plan of iteration k (``get_plan(k)``); plans ahead on rank 0.

    lengths_fn(k) gives the lengths of global batch k (only called on rank 0). ``plan_ahead=0``
    plans inline (synchronously) on rank 0. ``wait_s`` bounds the wait for a late plan
    (default: the planner time limit). ``startup_wait_s`` bounds the wait for the background
    process to start (spawn imports numpy/scipy), counted once. ``planner_fn`` ("module:function",
    same signature as ``plan_inline``) replaces the planner proper (not the fallback).
    """

    def __init__(self, cost: CostModel, planner_cfg: dict[str, Any], lengths_fn: LengthsFn | None, *,
                 plan_ahead: int = 2, rank: int = 0, dump_dir: str | os.PathLike | None = None,
                 wait_s: float | None = None, startup_wait_s: float = 60.0, group=None, broadcast: bool = True,
                 max_iterations: int | None = None, planner_fn: str | None = None) -> None:
        self.cost = cost
        self.cfg = dict(planner_cfg)
        self.lengths_fn = lengths_fn
        self.plan_ahead = int(plan_ahead)
        self.rank = rank
        self.group = group
        self.broadcast = broadcast
        self.max_iterations = max_iterations
        self.planner_fn = planner_fn
        self.wait_s = float(self.cfg.get("time_limit_s", 2.0) if wait_s is None else wait_s)
        self.startup_wait_s = startup_wait_s
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.counters = _Counters()
        self._proc = None
        self._ready = False
        self._lengths_cache: dict[int, list[int]] = {}
        self._sent: set[int] = set()
        self._results: dict[int, tuple[dict | None, float, str | None]] = {}
        self._dead_logged = False
        if rank == 0:
            if self.dump_dir:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
            if self.plan_ahead > 0:
                self._start_worker()

    # ------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        ctx = mp.get_context("spawn")
        self._req_q = ctx.Queue()
        self._res_q = ctx.Queue()
        self._needed_from = ctx.Value("q", 0, lock=False)
        self._proc = ctx.Process(target=_worker_main, name="flexsp-planner", daemon=True,
                                 args=(self._req_q, self._res_q, self.cost.to_dict(), self.cfg, self._needed_from,
                                       self.planner_fn))
        self._proc.start()

    def _lengths(self, k: int) -> list[int]:
        if k not in self._lengths_cache:
            self._lengths_cache[k] = [int(x) for x in self.lengths_fn(k)]
        return self._lengths_cache[k]

    def _submit_ahead(self, k: int) -> None:
        last = k + self.plan_ahead
        if self.max_iterations is not None:
            last = min(last, self.max_iterations - 1)
        for j in range(k, last + 1):
            if j not in self._sent:
                self._req_q.put((j, self._lengths(j)))
                self._sent.add(j)

    def _drain(self, block_until: float | None, want: int) -> None:
        """Collect results; with ``block_until``, block until ``want`` arrives or the deadline."""
        while True:
            if want in self._results:
                return
            timeout = None if block_until is None else block_until - time.monotonic()
            try:
                if timeout is None:
                    item = self._res_q.get_nowait()
                else:
                    if timeout <= 0:
                        return
                    item = self._res_q.get(timeout=min(timeout, 0.5))
            except queue.Empty:
                if block_until is None:
                    return
                if self._proc is not None and not self._proc.is_alive():
                    return
                continue
            k, plan_d, solve_s, err = item
            if k == "ready":
                self._ready = True
                continue
            self._results[k] = (plan_d, solve_s, err)

    def _worker_alive(self) -> bool:
        alive = self._proc is not None and self._proc.is_alive()
        if not alive and self._proc is not None and not self._dead_logged:
            log.error("planner process died (exit code %s); using the fallback plan from now on", self._proc.exitcode)
            self._dead_logged = True
        return alive

    # -------------------------------------------------------------- rank 0 plan
    def _plan_on_rank0(self, k: int) -> tuple[Plan, PlanInfo]:
        if self.plan_ahead == 0:
            lengths = [int(x) for x in self.lengths_fn(k)]
            t0 = time.perf_counter()
            try:
                plan = _resolve(self.planner_fn)(lengths, self.cost, self.cfg)
                return plan, PlanInfo(k, "inline", solve_time_s=time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - never stop training for a planner error
                log.error("planner failed on iteration %d (%s); using the fallback plan", k, e)
                return self._fallback(k, lengths, "fallback-error", 0.0, f"{type(e).__name__}: {e}")
        lengths = self._lengths(k)
        self._needed_from.value = k
        t_wait = time.perf_counter()
        if self._worker_alive():
            self._submit_ahead(k)
            now = time.monotonic()
            deadline = now + self.wait_s
            if not self._ready:
                deadline += self.startup_wait_s
            self._drain(deadline, k)
        else:
            self._drain(None, k)
        wait_ms = (time.perf_counter() - t_wait) * 1e3
        res = self._results.pop(k, None)
        for old in [j for j in self._results if j < k]:
            del self._results[old]
        for old in [j for j in self._lengths_cache if j <= k]:
            del self._lengths_cache[old]
        self._sent = {j for j in self._sent if j > k}
        if res is None:
            log.warning("plan of iteration %d not ready after %.0f ms; using the fallback plan", k, wait_ms)
            return self._fallback(k, lengths, "fallback-late", wait_ms, None)
        plan_d, solve_s, err = res
        if err is not None:
            log.error("planner failed on iteration %d; using the fallback plan:\n%s", k, err)
            return self._fallback(k, lengths, "fallback-error", wait_ms, err.splitlines()[0])
        try:
            plan = Plan.from_dict(plan_d)
            if plan.lengths != lengths:
                raise PlanError(f"planner answered for other lengths than batch {k}'s")
        except PlanError as e:
            log.error("planner returned an unusable plan for iteration %d (%s); using the fallback plan", k, e)
            return self._fallback(k, lengths, "fallback-error", wait_ms, str(e))
        return plan, PlanInfo(k, "planner", solve_time_s=solve_s, wait_ms=wait_ms)

    def _fallback(self, k: int, lengths: list[int], source: str, wait_ms: float, error: str | None):
        t0 = time.perf_counter()
        plan = plan_inline(lengths, self.cost, self.cfg, fallback=True)
        return plan, PlanInfo(k, source, solve_time_s=time.perf_counter() - t0, wait_ms=wait_ms, error=error)

    # ------------------------------------------------------------------ public
    def get_plan(self, k: int) -> tuple[Plan, PlanInfo]:
        """The plan of global batch ``k`` on every rank (collective when broadcasting)."""
        payload = None
        if self.rank == 0:
            plan, info = self._plan_on_rank0(k)
            key = info.source.replace("-", "_")
            setattr(self.counters, key, getattr(self.counters, key) + 1)
            self.counters.solve_time_s += info.solve_time_s
            if self.dump_dir:
                plan.save(self.dump_dir / f"plan_{k:07d}.json")
            payload = (plan.to_dict(), asdict(info))
        if self.broadcast:
            payload = broadcast_plan(payload, 0, self.group)
        plan_d, info_d = payload
        return Plan.from_dict(plan_d), PlanInfo(**info_d)

    def state_dict(self) -> dict[str, Any]:
        """Planner state for checkpoints: its configuration and counters (plans are a function of lengths)."""
        return {"config": dict(self.cfg), "cost_model": self.cost.to_dict(), "counters": asdict(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = state.get("counters") or {}
        self.counters = _Counters(**c)

    def close(self) -> None:
        """Stop the background process (bounded wait, then terminate)."""
        if self._proc is None:
            return
        try:
            self._req_q.put(None)
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._proc = None

    def __enter__(self) -> "PlannerHook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
