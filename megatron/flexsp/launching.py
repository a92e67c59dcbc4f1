"""Starting and stopping child processes: a free port, the process tree, a run with a time limit.

Why one module: the trainer (single-process rendezvous), the tests, the benchmarks and the
scripts all pick rendezvous ports and start jobs (torchrun, the emulated cluster) that must be
bounded in time and leave nothing behind. torchrun starts each rank in a session of its own, so
killing the launcher's process group is not enough; one copy of the rule keeps every caller
right. Standard library only: tests, benchmarks and scripts import it without importing torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "TIMED_OUT",
    "Finished",
    "free_port",
    "torchrun_command",
    "descendants",
    "kill_tree",
    "stop_tree",
    "run_bounded",
]

TIMED_OUT = 124  # the exit code of a run stopped for running out of time (as coreutils' `timeout`)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torchrun_command(
    nproc: int, *, port: int | None = None, python: str = sys.executable, addr: str = "127.0.0.1"
) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` ranks on this host; the entry point and its
    flags follow. The rendezvous is ``addr:port``, a free port unless given."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        addr,
        "--master-port",
        str(port if port is not None else free_port(addr)),
    ]


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children, grandchildren, ...), read from /proc; [] without /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # fields after "(comm)": state, ppid
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(proc: subprocess.Popen | int) -> None:
    """SIGKILL a process, everything below it and, when it leads its own process group, that group.

    Twice over, for processes forked meanwhile. The group catches orphans already reparented
    away from the tree; the tree catches ranks that torchrun started in sessions of their own.
    A ``Popen`` is reaped afterwards.
    """
    pid = proc if isinstance(proc, int) else proc.pid
    for _ in range(2):
        for q in [*descendants(pid)[::-1], pid]:
            _signal(q, signal.SIGKILL)
        try:
            if os.getpgid(pid) == pid:  # never our own group: a child in it is not its leader
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if not isinstance(proc, int):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def stop_tree(proc: subprocess.Popen, term_grace_s: float = 0.0) -> None:
    """Stop a child and its tree: SIGTERM to the child first when ``term_grace_s`` > 0 (a script
    that cleans up on TERM, like the emulated cluster's namespaces, gets that long), then SIGKILL."""
    if term_grace_s > 0 and proc.poll() is None:
        _signal(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=term_grace_s)
        except subprocess.TimeoutExpired:
            pass
    kill_tree(proc)


@dataclass(frozen=True)
class Finished:
    """How a bounded run ended; ``stdout``/``stderr`` hold the output only when it was captured."""

    args: list[str]
    returncode: int  # TIMED_OUT when the run was stopped for running out of time
    timed_out: bool
    stdout: str = ""
    stderr: str = ""


def run_bounded(
    cmd: Sequence[str],
    timeout_s: float,
    *,
    log: Path | str | None = None,
    capture: bool = False,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    term_grace_s: float = 0.0,
) -> Finished:
    """Run ``cmd`` to its end or for ``timeout_s`` seconds; on expiry or interrupt, stop its whole tree.

    Output goes to ``log`` (stdout and stderr together), or is returned (``capture``), or is
    inherited. ``new_session`` (default) puts the job in a session of its own, so a stray rank
    cannot outlive it; a caller whose children must stay reachable by its own killer (the outer
    ``timeout`` of a script) passes False. Ctrl-C and other exceptions stop the tree and propagate.
    """
    sink: IO[str] | None = open(log, "w") if log is not None else None  # noqa: SIM115 - closed below
    pipe = subprocess.PIPE if capture else None
    try:
        p = subprocess.Popen(
            list(cmd),
            stdout=sink or pipe,
            stderr=subprocess.STDOUT if sink else pipe,
            cwd=cwd,
            env=None if env is None else dict(env),
            text=True,
            start_new_session=new_session,
        )
        try:
            out, err = p.communicate(timeout=timeout_s)
            return Finished(list(cmd), p.returncode, False, out or "", err or "")
        except subprocess.TimeoutExpired:
            stop_tree(p, term_grace_s)
            out, err = p.communicate()
            return Finished(list(cmd), TIMED_OUT, True, out or "", err or "")
        finally:
            if p.poll() is None:  # interrupted while waiting: take the job down with us
                stop_tree(p, term_grace_s)
    finally:
        if sink is not None:
            sink.close()
