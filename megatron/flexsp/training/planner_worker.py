"""The planner's background process on rank 0, and planning one batch in this process.

Why apart from the hook: the hook decides which plan an iteration gets and how long it waits;
this module owns the process that plans ahead (spawned, lowest CPU priority, one thread per
numerical library, exits when the trainer dies) and the wire format of its queues, so each can
be read without the other.

Queue protocol: requests are ``(k, lengths)``, ``("update", cost dict | None, PlannerConfig |
None)`` or None (exit); answers are ``(k, plan dict | None, (wall s, cpu s), error | None)``,
``("ready", ...)`` once at start-up, and ``error == "skipped"`` for a request already stale.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from megatron.flexsp.planner.api import PlannerConfig
from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.plan import Plan

__all__ = [
    "PlanFn",
    "PlannerWorker",
    "SolveClock",
    "as_planner_config",
    "plan_inline",
    "resolve_planner_fn",
    "worker_main",
]

PlanFn = Callable[..., Plan]


class SolveClock:
    """Wall and CPU seconds since it was made: what one plan cost (logged per iteration)."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def times(self) -> tuple[float, float]:
        """(wall s, CPU s) so far."""
        return time.perf_counter() - self.t0, time.process_time() - self.c0


def as_planner_config(cfg: PlannerConfig | dict[str, Any]) -> PlannerConfig:
    """The PlannerConfig itself; a dict of its fields is still accepted for one release (deprecated)."""
    if isinstance(cfg, PlannerConfig):
        return cfg
    if isinstance(cfg, dict):
        return PlannerConfig(**cfg)
    raise TypeError(f"planner config must be a PlannerConfig, got {type(cfg).__name__}")


def plan_inline(lengths: Sequence[int], cost: CostModel, cfg: PlannerConfig, *, fallback: bool = False) -> Plan:
    """Plan one global batch in this process (the planner proper, or its fast fallback)."""
    from megatron.flexsp.planner import api

    cfg = as_planner_config(cfg)
    lengths = [int(x) for x in lengths]
    if fallback:
        return api.fallback_plan(lengths, cost, cfg)
    return api.plan_global_batch(lengths, cost, cfg)


def resolve_planner_fn(planner_fn: str | None) -> PlanFn:
    """``module:function`` with plan_inline's signature (a custom planner), default plan_inline."""
    if not planner_fn:
        return plan_inline
    import importlib

    mod, _, name = planner_fn.partition(":")
    return getattr(importlib.import_module(mod), name)


# The worker runs beside the trainer's ranks on their cores: the lowest CPU priority and one
# thread for every numerical library, so it only ever takes time the ranks leave idle.
_ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


def worker_main(
    req_q, res_q, cost_dict: dict[str, Any], cfg: PlannerConfig, needed_from, planner_fn: str | None = None
) -> None:
    """Background planner: (k, lengths) in, (k, plan dict | None, (wall s, cpu s), error) out; skips stale k.

    ("update", cost dict | None, PlannerConfig | None) replaces the cost model and/or the settings
    for every later request (the trainer's online calibration and automatic time limit).
    """
    try:
        os.nice(19)  # the planner must not steal the trainer's CPU time on shared hosts
    except (OSError, AttributeError):
        pass
    cost = CostModel.from_dict(cost_dict)
    plan_fn = resolve_planner_fn(planner_fn)
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
        if item[0] == "update":
            _, new_cost, new_cfg = item
            cost = CostModel.from_dict(new_cost) if new_cost is not None else cost
            cfg = new_cfg if new_cfg is not None else cfg
            continue
        k, lengths = item
        if k < needed_from.value:  # the trainer already moved past it (fallback used)
            res_q.put((k, None, (0.0, 0.0), "skipped"))  # still a sign of life for the hang detector
            continue
        clock = SolveClock()
        try:
            plan = plan_fn(lengths, cost, cfg)
            res_q.put((k, plan.to_dict(), clock.times(), None))
        except BaseException as e:  # noqa: BLE001 - reported to the trainer, which falls back
            res_q.put((k, None, clock.times(), f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class PlannerWorker:
    """One spawned planner process with its queues; knows when it was started and last heard from."""

    def __init__(self, cost_dict: dict[str, Any], cfg: PlannerConfig, planner_fn: str | None) -> None:
        ctx = mp.get_context("spawn")
        self.req_q = ctx.Queue()
        self.res_q = ctx.Queue()
        self.needed_from = ctx.Value("q", 0, lock=False)
        self.proc = ctx.Process(
            target=worker_main,
            name="flexsp-planner",
            daemon=True,
            args=(self.req_q, self.res_q, cost_dict, cfg, self.needed_from, planner_fn),
        )
        self.started = time.monotonic()
        self.last_heard = self.started
        self.ready = False
        # k -> when sent, until answered: the worker answers every request (a plan, an error, or "skipped"
        # for a stale k), so an entry that stays here while the worker is silent is work it hangs on
        self.sent: dict[int, float] = {}
        saved = {k: os.environ.get(k) for k in _ONE_THREAD}
        os.environ.update(_ONE_THREAD)  # the spawned interpreter reads them before numpy loads
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self, grace_s: float = 2.0, *, graceful: bool = True) -> None:
        """Ask to exit (``graceful``), then kill; never blocks the caller longer than ~2 * grace_s.

        A hung or never-ready worker cannot read the request: it is killed at once."""
        if graceful and self.proc.is_alive():
            try:
                self.req_q.put(None)
            except (OSError, ValueError):
                pass
            self.proc.join(timeout=grace_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=grace_s)
        for q in (self.req_q, self.res_q):
            q.cancel_join_thread()  # a dead reader must not make interpreter exit wait on the feeder thread
            q.close()
