"""Staying alive on a shared cluster: exit on a signal or a deadline, skip non-finite steps, bound hangs.

Why each piece:

* ``ExitMonitor``: SLURM warns a job before killing it (``--signal=B:USR1@90``) and a run may
  have a wall-clock budget (``--exit-duration-in-mins``). A signal reaches ranks at different
  moments, so the decision to stop is taken collectively at an iteration boundary (one flag in a
  MAX all-reduce that the step already does), then every rank saves and exits 0 together.
* ``NonFiniteGuard``: one inf gradient must not poison the weights, the optimizer state or a
  checkpoint. The loss and the gradient norm are global values (the loss is all-reduced, the
  norm reduced over every shard), so every rank reaches the same verdict; the flag still rides
  the same all-reduce so a rank-local anomaly cannot split the ranks. A bad step is skipped
  (no parameter, optimizer-state or scheduler change); too many in a row stop the run with a
  distinct exit code while ``latest`` still names the last finite checkpoint.
* ``ProgressWatchdog``: a stopped or dead peer leaves the others blocked in a collective. A
  thread per rank publishes a liveness beat in the rendezvous store; when the main loop makes no
  progress within the limit, the rank dumps every thread's stack (faulthandler) and exits
  non-zero, naming the iteration and the ranks whose beat went silent.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXIT_USER_ERROR",
    "EXIT_NONFINITE",
    "EXIT_HUNG",
    "WATCHDOG_SHARE_OF_TIMEOUT",
    "ExitMonitor",
    "NonFiniteGuard",
    "ProgressWatchdog",
    "TooManySkippedSteps",
]

log = logging.getLogger("flexsp.train")

EXIT_USER_ERROR = 2  # bad settings, inputs or checkpoints: one line on every rank
EXIT_NONFINITE = 3  # --max-skipped-steps consecutive non-finite steps
EXIT_HUNG = 4  # the progress watchdog fired
# The watchdog's limit as a share of --distributed-timeout-minutes: it must fire before a blocked
# collective times out on its own (a gloo/NCCL timeout names no culprit).
WATCHDOG_SHARE_OF_TIMEOUT = 0.8


class TooManySkippedSteps(RuntimeError):
    """Raised when --max-skipped-steps consecutive steps were non-finite; the run stops with EXIT_NONFINITE."""


# --------------------------------------------------------------------------- exit


class ExitMonitor:
    """Local "please stop" state: a caught signal or a passed deadline; ``flag()`` feeds the collective vote."""

    def __init__(self, *, signal_name: str | None, duration_mins: float | None, start_time: float | None = None):
        self.signal_name = signal_name
        self.deadline = None if duration_mins is None else (start_time or time.monotonic()) + 60.0 * duration_mins
        self.received: str | None = None
        self._previous: Any = None
        if signal_name:
            signum = getattr(signal, signal_name)
            self._previous = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self.received = signal.Signals(signum).name

    def flag(self) -> float:
        """1.0 when this rank wants to stop (a signal arrived or the deadline passed), else 0.0."""
        return max(self.votes())

    def votes(self) -> tuple[float, float]:
        """(signal, deadline) flags for the collective vote: each rank's clock starts a little apart, so
        the reason is voted too, and every rank names the same one."""
        passed = self.deadline is not None and time.monotonic() >= self.deadline
        return (1.0 if self.received else 0.0), (1.0 if passed else 0.0)

    def reason(self, voted: tuple[float, float] | None = None) -> str:
        """Why the run stops: this rank's own reason, or (``voted``: the MAX of every rank's ``votes()``) the run's."""
        if self.received:
            return f"received {self.received}"
        if voted is not None and voted[0] > 0:
            return "another rank received the exit signal"
        if (voted is not None and voted[1] > 0) or (self.deadline is not None and time.monotonic() >= self.deadline):
            return "--exit-duration-in-mins reached"
        return "another rank asked to stop"

    def close(self) -> None:
        if self.signal_name and self._previous is not None:
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None


# ---------------------------------------------------------------------- non-finite


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; ``check`` says whether this step may update the model."""

    max_consecutive: int
    skipped_total: int = 0
    consecutive: int = 0

    @staticmethod
    def local_flag(loss: float, grad_norm: float) -> float:
        """1.0 when the loss or the gradient norm is not finite (the value voted over ranks)."""
        return 0.0 if (abs(loss) < float("inf") and abs(grad_norm) < float("inf")) else 1.0

    def check(self, bad: bool, iteration: int, loss: float, grad_norm: float) -> bool:
        """True: take the step. False: skip it (logged, counted); raises past --max-skipped-steps in a row."""
        if not bad:
            self.consecutive = 0
            return True
        self.skipped_total += 1
        self.consecutive += 1
        log.warning(
            "iteration %d: non-finite step (loss %s, grad norm %s): skipped, no parameter, optimizer or "
            "scheduler change (%d in a row, %d in total)",
            iteration,
            loss,
            grad_norm,
            self.consecutive,
            self.skipped_total,
        )
        if self.consecutive >= self.max_consecutive:
            raise TooManySkippedSteps(
                f"{self.consecutive} consecutive non-finite steps (--max-skipped-steps "
                f"{self.max_consecutive}) at iteration {iteration}: stopping; the last "
                "checkpoint holds only finite values (lower --lr or check the data)"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive = int(state.get("consecutive", 0))


# ------------------------------------------------------------------------ watchdog


class ProgressWatchdog:
    """A daemon thread that ends the process when ``beat()`` is not called within ``limit_s``.

    ``store``: the rendezvous store (any object with ``set``/``get``/``check``), where each rank's
    thread writes a liveness time every ``period_s``; when the limit passes, the silent ranks are
    named. ``on_fire`` replaces ``os._exit`` (tests).
    """

    def __init__(
        self,
        limit_s: float,
        *,
        rank: int,
        world_size: int,
        store: Any = None,
        period_s: float = 2.0,
        on_fire: Callable[[int], None] | None = None,
    ) -> None:
        self.limit_s = float(limit_s)
        self.rank, self.world_size = rank, world_size
        self.store = store
        self.period_s = min(period_s, max(0.1, self.limit_s / 4))
        self.on_fire = on_fire or os._exit
        self.iteration = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexsp-watchdog", daemon=True)
        self._thread.start()

    def beat(self, iteration: int) -> None:
        """The main loop made progress (call after every iteration, validation and save)."""
        self.iteration = iteration
        self._last = time.monotonic()

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"watchdog/alive/{self.rank}", repr(time.time()))
        except Exception:  # noqa: BLE001 - a store hiccup must not kill a healthy run
            pass

    def silent_ranks(self, now: float | None = None) -> list[int]:
        """Ranks whose liveness beat is older than the limit (or never came)."""
        if self.store is None:
            return []
        now = time.time() if now is None else now
        out = []
        for r in range(self.world_size):
            key = f"watchdog/alive/{r}"
            try:
                seen = float(self.store.get(key).decode()) if self.store.check([key]) else None
            except Exception:  # noqa: BLE001
                seen = None
            if seen is None or now - seen > max(3 * self.period_s, min(self.limit_s, 30.0)):
                out.append(r)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._publish()
            idle = time.monotonic() - self._last
            if idle > self.limit_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        silent = [r for r in self.silent_ranks() if r != self.rank]
        who = f"; ranks not responding: {silent}" if silent else ""
        print(
            f"[rank {self.rank}] error: no training progress for {idle:.0f} s after iteration {self.iteration} "
            f"(limit {self.limit_s:.0f} s, --distributed-timeout-minutes){who}; stacks of every thread follow",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        self.on_fire(EXIT_HUNG)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
