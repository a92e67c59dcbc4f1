"""megatron.flexsp.launching: torch-free, a run past its limit leaves no process behind (torchrun's
ranks sit in sessions of their own, so the tree is killed, not only the group), output is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.flexsp.launching import TIMED_OUT, free_port, kill_tree, run_bounded

# A child that starts a grandchild in a session of its own (as torchrun does with its ranks).
_TREE = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "open(sys.argv[1], 'w').write(str(p.pid))\n"
    "print('started', flush=True)\n"
    "p.wait()\n"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _wait_file(path: Path, deadline_s: float = 20.0) -> str:
    end = time.monotonic() + deadline_s
    while not (path.exists() and path.read_text()) and time.monotonic() < end:
        time.sleep(0.05)
    return path.read_text()


def test_importing_it_does_not_import_torch():
    code = "import sys, megatron.flexsp.launching; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("new_session", [True, False])
def test_timeout_kills_the_tree_and_keeps_the_log(tmp_path, new_session):
    info, log = tmp_path / "pid", tmp_path / "out.log"
    t0 = time.monotonic()
    r = run_bounded([sys.executable, "-c", _TREE, str(info)], 3, log=log, new_session=new_session)
    grandchild = int(info.read_text())
    try:
        assert (r.returncode, r.timed_out) == (TIMED_OUT, True)
        assert time.monotonic() - t0 < 15
        assert "started" in log.read_text()
        end = time.monotonic() + 5
        while _alive(grandchild) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(grandchild), "a process in a session of its own outlived the run"
    finally:
        kill_tree(grandchild)


def test_capture_and_exit_code():
    r = run_bounded(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 60, capture=True
    )
    assert (r.returncode, r.timed_out, r.stdout, r.stderr) == (3, False, "out\n", "err\n")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_kill_tree_of_a_popen_reaps_it(tmp_path):
    info = tmp_path / "pid"
    p = subprocess.Popen([sys.executable, "-c", _TREE, str(info)], stdout=subprocess.DEVNULL, start_new_session=True)
    grandchild = int(_wait_file(info))
    kill_tree(p)
    assert p.returncode is not None and not _alive(p.pid)
    end = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert os.getpgid(0) != p.pid  # our own group was never the target
