"""Launching the real entry point with torchrun in tests, and acting on its processes as a cluster would.

Why shared: the end-to-end, fault and restart tests all start ``pretrain_gpt_flexsp.py`` under
torchrun in its own session, find its rank processes, and kill the whole tree when a test is done
or has failed; one copy of that keeps every such test bounded the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from megatron.flexsp.launching import descendants, kill_tree, torchrun_command

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["as_flags", "tiny_gpt", "torchrun", "descendants", "rank_pids", "kill_tree", "losses"]


def as_flags(**flags: object) -> list[str]:
    """``--name value`` for each keyword (underscores become dashes; True stands for a bare switch)."""
    out: list[str] = []
    for name, value in flags.items():
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def tiny_gpt(hidden_size: int = 32, seq_length: int = 512, **more: object) -> list[str]:
    """The small GPT the end-to-end tests train: 2 layers, 4 heads in 2 query groups, SwiGLU; then ``more``."""
    return as_flags(
        num_layers=2,
        hidden_size=hidden_size,
        num_attention_heads=4,
        num_query_groups=2,
        group_query_attention=True,
        swiglu=True,
        seq_length=seq_length,
        **more,
    )


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
        *torchrun_command(nproc, port=port or None),
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
