"""The planner hook: plans of upcoming global batches, computed ahead on rank 0, broadcast to all.

Rank 0 owns a background process (multiprocessing, spawn context: the planner never needs
torch or CUDA state) that plans global batch k+1..k+N while batch k trains; it only needs the
batch lengths (``sampler.batch_lengths(k)``, no token reads). When iteration k starts, rank 0
takes plan k if ready, waits for it at most ``wait_s`` (default: the planner's time limit), and
otherwise plans with the fast fallback (greedy for FlexSP, the baseline itself otherwise). A
planner error never stops training: it is logged and the fallback is used. Rank 0 then
broadcasts the plan, so it is the single source of truth and every rank runs the same schedule.

Bounded waits, whatever the worker does (issue 11):

* The worker's start-up (spawn imports numpy/scipy and the planner) is waited for at most
  ``startup_wait_s``, once per run: a worker that is alive but never says "ready" costs that
  wait on the first iteration only; later iterations wait at most ``wait_s``.
* A worker that died, that stays silent with work outstanding for ``hang_s``, or that is not
  ready ``startup_wait_s`` after it was spawned, is killed and restarted (at most
  ``max_restarts`` times, each with a log line); plans fall back meanwhile, and no iteration
  waits for a restarted worker's start-up.

A plan crosses each boundary once as its JSON dict: ``Plan.to_dict()`` in the worker, one
``Plan.from_dict`` on rank 0; the same dict is broadcast once and each other rank builds its
Plan once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron.flexsp.planner.api import PlannerConfig
from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.plan import Plan, PlanError

from .config_types import FlexSPConfig
from .distributed import broadcast_object
from .planner_worker import PlannerWorker, SolveClock, as_planner_config, plan_inline, resolve_planner_fn

__all__ = ["PlanInfo", "PlannerHook", "plan_inline", "as_planner_config"]

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
    cpu_s: float = 0.0  # CPU seconds the planner spent on this plan (background process or inline)


def _write_plan_json(path: Path, plan_d: dict[str, Any]) -> None:
    """Plan.save's format (indented JSON, atomic) from the dict already at hand."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan_d, indent=1) + "\n")
    tmp.replace(path)


@dataclass
class _Counters:
    planner: int = 0
    inline: int = 0
    fallback_late: int = 0
    fallback_error: int = 0
    solve_time_s: float = 0.0
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class PlannerHook:
    """Gives every rank the plan of iteration k (``get_plan(k)``); plans ahead on rank 0.

    ``planner_cfg``: the planner's PlannerConfig (a dict of its fields is still accepted, deprecated).
    lengths_fn(k) gives the lengths of global batch k (only called on rank 0). ``plan_ahead=0``
    plans inline (synchronously) on rank 0. ``wait_s`` bounds the wait for a late plan
    (default: the planner time limit). ``startup_wait_s`` bounds the wait for the background
    process to start, paid at most once per run. ``hang_s`` (default max(20, 5 * wait_s)): a worker
    silent that long with work outstanding is restarted; ``max_restarts`` bounds restarts.
    ``planner_fn`` ("module:function", same signature as ``plan_inline``) replaces the planner
    proper (not the fallback).
    """

    def __init__(
        self,
        cost: CostModel,
        planner_cfg: PlannerConfig,
        lengths_fn: LengthsFn | None,
        *,
        plan_ahead: int = FlexSPConfig.plan_ahead,
        rank: int = 0,
        dump_dir: str | os.PathLike | None = None,
        wait_s: float | None = None,
        startup_wait_s: float = 60.0,
        group=None,
        broadcast: bool = True,
        max_iterations: int | None = None,
        planner_fn: str | None = None,
        max_restarts: int = 3,
        hang_s: float | None = None,
    ) -> None:
        self.cost = cost
        self.cfg = as_planner_config(planner_cfg)
        self.lengths_fn = lengths_fn
        self.plan_ahead = int(plan_ahead)
        self.rank = rank
        self.group = group
        self.broadcast = broadcast
        self.max_iterations = max_iterations
        self.planner_fn = planner_fn
        self.wait_s = float(self.cfg.time_limit_s if wait_s is None else wait_s)
        self.startup_wait_s = float(startup_wait_s)
        self.hang_s = float(max(20.0, 5.0 * self.wait_s) if hang_s is None else hang_s)
        self.max_restarts = int(max_restarts)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.counters = _Counters()
        self._worker: PlannerWorker | None = None
        self._startup_deadline: float | None = None  # the one start-up wait of the run
        self._lengths_cache: dict[int, list[int]] = {}
        self._results: dict[int, tuple[dict | None, float, str | None]] = {}
        self._gave_up = False
        self._cost_dict = cost.to_dict() if rank == 0 else {}
        if rank == 0:
            if self.dump_dir:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
            if self.plan_ahead > 0:
                self._worker = PlannerWorker(self._cost_dict, self.cfg, self.planner_fn)
                self._startup_deadline = self._worker.started + self.startup_wait_s

    # ------------------------------------------------------------------ worker
    @property
    def _proc(self):
        """The current worker process (None when there is none): for tests and diagnostics."""
        return self._worker.proc if self._worker is not None else None

    def _lengths(self, k: int) -> list[int]:
        if k not in self._lengths_cache:
            self._lengths_cache[k] = [int(x) for x in self.lengths_fn(k)]
        return self._lengths_cache[k]

    def _submit_ahead(self, k: int) -> None:
        w = self._worker
        last = k + self.plan_ahead
        if self.max_iterations is not None:
            last = min(last, self.max_iterations - 1)
        for j in range(k, last + 1):
            if j not in w.sent and j not in self._results:
                w.req_q.put((j, self._lengths(j)))
                w.sent[j] = time.monotonic()

    def _take(self, item: tuple) -> None:
        w = self._worker
        w.last_heard = time.monotonic()
        k, plan_d, times, err = item
        if k == "ready":
            w.ready = True
            return
        w.sent.pop(k, None)
        if err != "skipped":
            self._results[k] = (plan_d, times, err)

    def _drain(self, block_until: float | None, want: int) -> None:
        """Collect results; with ``block_until``, block until ``want`` arrives, the deadline, or a dead worker."""
        w = self._worker
        while want not in self._results:
            try:
                if block_until is None:
                    item = w.res_q.get_nowait()
                else:
                    timeout = block_until - time.monotonic()
                    if timeout <= 0:
                        return
                    item = w.res_q.get(timeout=min(timeout, 0.25))
            except queue.Empty:
                if block_until is None or not w.alive():
                    return
                continue
            self._take(item)

    def _health(self) -> str | None:
        """Why the worker must be replaced now (dead, hung, never ready), or None."""
        w = self._worker
        now = time.monotonic()
        if not w.alive():
            return f"planner process died (exit code {w.proc.exitcode})"
        if not w.ready:
            if now - w.started > self.startup_wait_s:
                return f"planner process not ready {now - w.started:.1f} s after start (limit {self.startup_wait_s} s)"
            return None
        if w.sent and now - max(w.last_heard, min(w.sent.values())) > self.hang_s:
            return (
                f"planner process silent for {now - w.last_heard:.1f} s with work outstanding (limit {self.hang_s} s)"
            )
        return None

    def _check_worker(self) -> None:
        """Restart a dead, hung or never-ready worker (bounded); give up on it after max_restarts."""
        if self._worker is None:
            return
        self._drain(None, -1)  # answers already queued are signs of life
        why = self._health()
        if why is None:
            return
        self._worker.stop(grace_s=1.0, graceful=False)
        self._worker = None
        if self.counters.restarts >= self.max_restarts:
            log.error(
                "%s; restarted %d times already (max): using the fallback plan from now on", why, self.counters.restarts
            )
            self._gave_up = True
            return
        self.counters.restarts += 1
        log.warning(
            "%s; restarting it (%d of at most %d), fallback plans meanwhile",
            why,
            self.counters.restarts,
            self.max_restarts,
        )
        self._worker = PlannerWorker(self._cost_dict, self.cfg, self.planner_fn)

    # -------------------------------------------------------------- rank 0 plan
    def _plan_on_rank0(self, k: int) -> tuple[Plan, dict[str, Any] | None, PlanInfo]:
        """(plan, its dict if already at hand, info)."""
        if self.plan_ahead == 0:
            return self._plan_here(k)
        lengths = self._lengths(k)
        t_wait = time.perf_counter()
        self._wait_for_worker(k)
        wait_ms = (time.perf_counter() - t_wait) * 1e3
        res = self._results.pop(k, None)
        for old in [j for j in self._results if j < k]:
            del self._results[old]
        for old in [j for j in self._lengths_cache if j <= k]:
            del self._lengths_cache[old]
        if res is None:
            if not self._gave_up:
                log.warning("plan of iteration %d not ready after %.0f ms; using the fallback plan", k, wait_ms)
            return self._fallback(k, lengths, "fallback-late", wait_ms, None)
        return self._use_answer(k, lengths, res, wait_ms)

    def _plan_here(self, k: int) -> tuple[Plan, None, PlanInfo]:
        """--flexsp-plan-ahead 0: the planner proper in this process, the fallback if it fails."""
        lengths = [int(x) for x in self.lengths_fn(k)]
        clock = SolveClock()
        try:
            plan = resolve_planner_fn(self.planner_fn)(lengths, self.cost, self.cfg)
        except Exception as e:  # noqa: BLE001 - never stop training for a planner error
            log.error("planner failed on iteration %d (%s); using the fallback plan", k, e)
            return self._fallback(k, lengths, "fallback-error", 0.0, f"{type(e).__name__}: {e}")
        solve_s, cpu_s = clock.times()
        return plan, None, PlanInfo(k, "inline", solve_time_s=solve_s, cpu_s=cpu_s)

    def _wait_for_worker(self, k: int) -> None:
        """Ask for k and the batches after it; wait for k at most wait_s (the first start-up: longer, once)."""
        self._check_worker()
        w = self._worker
        if w is None:
            return
        w.needed_from.value = k
        self._submit_ahead(k)
        now = time.monotonic()
        if w.ready or w.alive() and self._startup_deadline is not None and now < self._startup_deadline:
            # waits at most wait_s; the first worker's start-up extends the first wait only
            deadline = now + self.wait_s
            if not w.ready and self._startup_deadline is not None:
                deadline = max(deadline, self._startup_deadline)
            self._drain(deadline, k)
        else:
            self._drain(None, k)  # a (re)starting worker: take what is there, never wait for start-up
        if self._startup_deadline is not None and (w.ready or time.monotonic() >= self._startup_deadline):
            self._startup_deadline = None  # paid (or not needed): never again

    def _use_answer(
        self, k: int, lengths: list[int], res: tuple[dict | None, Any, str | None], wait_ms: float
    ) -> tuple[Plan, dict[str, Any] | None, PlanInfo]:
        """The worker's plan of batch k, or the fallback when it reported an error or an unusable plan."""
        plan_d, (solve_s, cpu_s), err = res
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
        return plan, plan_d, PlanInfo(k, "planner", solve_time_s=solve_s, wait_ms=wait_ms, cpu_s=cpu_s)

    def _fallback(
        self, k: int, lengths: list[int], source: str, wait_ms: float, error: str | None
    ) -> tuple[Plan, None, PlanInfo]:
        clock = SolveClock()
        plan = plan_inline(lengths, self.cost, self.cfg, fallback=True)
        solve_s, cpu_s = clock.times()
        return plan, None, PlanInfo(k, source, solve_time_s=solve_s, wait_ms=wait_ms, error=error, cpu_s=cpu_s)

    # ------------------------------------------------------------------ public
    def get_plan(self, k: int) -> tuple[Plan, PlanInfo]:
        """The plan of global batch ``k`` on every rank (collective when broadcasting)."""
        plan: Plan | None = None
        payload = None
        if self.rank == 0:
            plan, plan_d, info = self._plan_on_rank0(k)
            key = info.source.replace("-", "_")
            setattr(self.counters, key, getattr(self.counters, key) + 1)
            self.counters.solve_time_s += info.solve_time_s
            if plan_d is None and (self.broadcast or self.dump_dir):
                plan_d = plan.to_dict()
            if self.dump_dir:
                _write_plan_json(self.dump_dir / f"plan_{k:07d}.json", plan_d)
            payload = (plan_d, asdict(info))
        if self.broadcast:
            payload = broadcast_object(payload, 0, self.group)
        plan_d, info_d = payload
        if plan is None:
            plan = Plan.from_dict(plan_d)
        return plan, PlanInfo(**info_d)

    def update(self, *, cost: CostModel | None = None, time_limit_s: float | None = None) -> None:
        """Plan later batches with a new cost model (calibration) and/or time limit (--flexsp-time-limit auto).

        Rank 0 only; the background process gets the change before any request sent after it."""
        if self.rank != 0:
            return
        new_cfg = None
        if time_limit_s is not None and time_limit_s != self.cfg.time_limit_s:
            new_cfg = self.cfg = dataclasses.replace(self.cfg, time_limit_s=float(time_limit_s))
            self.wait_s = float(time_limit_s)
        cost_d = None
        if cost is not None:
            self.cost = cost
            cost_d = self._cost_dict = cost.to_dict()
        if self._worker is not None and (cost_d is not None or new_cfg is not None):
            self._worker.req_q.put(("update", cost_d, new_cfg))

    def state_dict(self) -> dict[str, Any]:
        """Planner state for checkpoints: its counters, and the cost model in force as a record.

        Not the configuration: it comes from this run's arguments (saved in meta.json), and plans
        are a function of the lengths; the calibration entry restores the calibrated model."""
        return {"cost_model": self.cost.to_dict(), "counters": asdict(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = state.get("counters") or {}
        known = set(_Counters.__dataclass_fields__)
        self.counters = _Counters(**{k: v for k, v in c.items() if k in known})

    def close(self) -> None:
        """Stop the background process (bounded wait, then kill)."""
        if self._worker is None:
            return
        w, self._worker = self._worker, None
        w.stop()

    def __enter__(self) -> PlannerHook:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
