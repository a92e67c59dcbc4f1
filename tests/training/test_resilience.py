"""The resilience components on their own: exit vote inputs, the non-finite guard, the progress watchdog."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from megatron.flexsp.training.resilience import (
    EXIT_HUNG,
    ExitMonitor,
    NonFiniteGuard,
    ProgressWatchdog,
    TooManySkippedSteps,
)


def test_exit_monitor_catches_its_signal_and_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    mon = ExitMonitor(signal_name="SIGUSR1", duration_mins=None)
    try:
        assert mon.flag() == 0.0
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while mon.flag() == 0.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mon.flag() == 1.0 and mon.reason() == "received SIGUSR1"
    finally:
        mon.close()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_exit_monitor_deadline():
    mon = ExitMonitor(signal_name=None, duration_mins=0.5 / 60, start_time=time.monotonic() - 1.0)
    assert mon.flag() == 1.0 and "exit-duration-in-mins" in mon.reason()
    assert ExitMonitor(signal_name=None, duration_mins=10).flag() == 0.0
    assert ExitMonitor(signal_name=None, duration_mins=10).reason() == "another rank asked to stop"


def test_non_finite_guard_skips_counts_and_stops():
    g = NonFiniteGuard(max_consecutive=3)
    assert NonFiniteGuard.local_flag(2.0, 1.0) == 0.0
    for bad in ((float("nan"), 1.0), (1.0, float("inf")), (float("-inf"), 0.0)):
        assert NonFiniteGuard.local_flag(*bad) == 1.0
    assert g.check(False, 1, 1.0, 1.0)
    assert not g.check(True, 2, 1.0, float("inf")) and not g.check(True, 3, 1.0, float("inf"))
    assert g.check(False, 4, 1.0, 1.0) and g.consecutive == 0 and g.skipped_total == 2
    g2 = NonFiniteGuard(max_consecutive=3)
    g2.load_state_dict(g.state_dict())
    assert g2.skipped_total == 2
    assert not g2.check(True, 5, 1.0, float("nan")) and not g2.check(True, 6, 1.0, float("nan"))
    with pytest.raises(TooManySkippedSteps, match="3 consecutive non-finite steps"):
        g2.check(True, 7, 1.0, float("nan"))


class _DictStore:
    def __init__(self):
        self.d: dict[str, bytes] = {}

    def set(self, k, v):
        self.d[k] = v.encode() if isinstance(v, str) else v

    def get(self, k):
        return self.d[k]

    def check(self, keys):
        return all(k in self.d for k in keys)


def test_watchdog_fires_without_progress_and_names_silent_ranks(capfd):
    store = _DictStore()
    store.set("watchdog/alive/1", repr(time.time() - 3600))  # rank 1 went silent an hour ago
    fired = threading.Event()
    codes = []

    def on_fire(code):
        codes.append(code)
        fired.set()

    wd = ProgressWatchdog(0.6, rank=0, world_size=3, store=store, period_s=0.1, on_fire=on_fire)
    try:
        wd.beat(5)
        assert fired.wait(5.0)
    finally:
        wd.close()
    assert codes == [EXIT_HUNG]
    err = capfd.readouterr().err
    assert "no training progress" in err and "after iteration 5" in err
    assert "ranks not responding: [1, 2]" in err  # 1 stale, 2 never beat; 0 is this rank
    assert "flexsp-watchdog" in err or "Thread" in err  # the stacks were dumped


def test_watchdog_stays_quiet_while_beats_come():
    fired = []
    wd = ProgressWatchdog(0.5, rank=0, world_size=1, period_s=0.05, on_fire=fired.append)
    try:
        for i in range(15):
            wd.beat(i)
            time.sleep(0.1)
    finally:
        wd.close()
    assert fired == []
