"""Launching the real entry point with torchrun in tests, and acting on its processes as a cluster would.

Why shared: the end-to-end, fault and restart tests all start ``pretrain_gpt_flexsp.py`` under
torchrun in its own session, find its rank processes, and kill the whole tree when a test is done
or has failed; one copy of that keeps every such test bounded the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron.flexsp.launching import descendants, free_port, kill_tree

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["torchrun", "descendants", "rank_pids", "kill_tree", "losses"]


def torchrun(
    args: list[str],
    log_path: Path | str,
    *,
    nproc: int = 4,
    port: int | None = None,
    extra_launcher: tuple[str, ...] = (),
) -> subprocess.Popen:
    """``torchrun --nproc-per-node nproc pretrain_gpt_flexsp.py args`` in a new session, output to ``log_path``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port or free_port()),
        *extra_launcher,
        str(ROOT / "pretrain_gpt_flexsp.py"),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)  # a test launched inside a SLURM job must not turn on SLURM defaults
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the trainer processes under a torchrun launcher (from their environment)."""
    out = {}
    for pid in descendants(proc.pid):
        try:
            env = dict(x.split("=", 1) for x in open(f"/proc/{pid}/environ").read().split("\0") if "=" in x)
            cmdline = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if "pretrain_gpt_flexsp.py" in cmdline and "RANK" in env and "multiprocessing" not in cmdline:
            out[int(env["RANK"])] = pid
    return out


def losses(path: Path | str) -> dict[int, float]:
    """iteration -> loss of a metrics JSONL file (empty when the file does not exist yet)."""
    if not Path(path).exists():
        return {}
    return {x["iteration"]: x["loss"] for x in map(json.loads, Path(path).read_text().splitlines()) if "loss" in x}
