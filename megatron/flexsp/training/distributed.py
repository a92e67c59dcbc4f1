"""Process start-up and shutdown shared by every entry point (trainer, profiler).

Why one module: the trainer and ``flexsp-profile`` are launched the same ways (torchrun, srun,
or one plain process), initialise the same process group and patches, and must end the same
way (a user error is one line and exit code 2 on every rank, the process group is always torn
down). Keeping that here means no entry point imports another one, and the rendezvous and
shutdown rules exist once.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron.flexsp.launching import free_port

__all__ = [
    "LaunchEnv",
    "LaunchError",
    "launch_env",
    "init_distributed",
    "shutdown_distributed",
    "broadcast_object",
    "run_entrypoint",
    "device_for_backend",
    "set_local_device",
]

# megatron.core's CPU-only notices: not actionable for our users, so every entry point hides them.
_QUIET_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated")


class LaunchError(ValueError):
    """The launch environment (torchrun / SLURM variables) cannot work; a user error."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits: its rank, the world, its node-local rank, and the rendezvous address."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: which attempt of the job this is


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    raise LaunchError(
        "launched by SLURM without MASTER_ADDR, and the first node of SLURM_JOB_NODELIST could "
        "not be resolved (no scontrol?): export MASTER_ADDR and MASTER_PORT"
    )


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank and rendezvous from torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), else SLURM, else 1 process."""
    e = os.environ if environ is None else environ

    def num(key: str) -> int:
        try:
            return int(e[key])
        except ValueError:
            raise LaunchError(f"environment variable {key}={e[key]!r} is not an integer") from None

    if "RANK" in e and "WORLD_SIZE" in e:
        rank, ws = num("RANK"), num("WORLD_SIZE")
        local = num("LOCAL_RANK") if "LOCAL_RANK" in e else (num("SLURM_LOCALID") if "SLURM_LOCALID" in e else rank)
        lws = num("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in e else ws
    elif "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        rank, ws = num("SLURM_PROCID"), num("SLURM_NTASKS")
        local = num("SLURM_LOCALID") if "SLURM_LOCALID" in e else 0
        if e.get("SLURM_NTASKS_PER_NODE", "").isdigit():
            lws = num("SLURM_NTASKS_PER_NODE")
        else:
            lws = max(1, ws // max(1, int(e.get("SLURM_NNODES", "1") or 1)))
    else:
        rank, ws, local, lws = 0, 1, 0, 1
    if not 0 <= rank < ws:
        raise LaunchError(f"rank {rank} is outside world size {ws} (check RANK/WORLD_SIZE)")
    addr = e.get("MASTER_ADDR")
    if addr is None:
        addr = "127.0.0.1" if ws == 1 else (_slurm_master() if "SLURM_PROCID" in e else None)
        if addr is None:
            raise LaunchError(f"world size {ws} but MASTER_ADDR is not set: launch with torchrun or srun")
    port = num("MASTER_PORT") if "MASTER_PORT" in e else (free_port() if ws == 1 else 29500)
    restarts = num("TORCHELASTIC_RESTART_COUNT") if "TORCHELASTIC_RESTART_COUNT" in e else 0
    return LaunchEnv(rank, ws, local, lws, addr, port, restarts)


def device_for_backend(backend: str | None) -> tuple[str, torch.device | None]:
    """(backend, device kind) for a requested backend: gloo runs on the CPU even where CUDA exists.

    Why: the gloo test suite and CPU runs must behave the same on a GPU node; only NCCL (the
    default where CUDA is present) puts a rank on a GPU. Returns the device as None for CUDA
    (the local rank picks the index).
    """
    if backend == "gloo":  # decided without asking CUDA: a gloo run never touches the GPU
        return backend, torch.device("cpu")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        if not cuda:
            raise LaunchError("--distributed-backend nccl needs CUDA GPUs; use gloo on CPU")
        return backend, None
    return backend, torch.device("cpu")


def _rendezvous_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The TCP store of the rendezvous: torchrun's agent hosts it (workers are clients), else rank 0."""
    if env.world_size == 1:
        return dist.HashStore()
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=env.rank == 0 and not agent_hosts,
        timeout=timeout,
        multi_tenant=not agent_hosts,
    )


def init_distributed(env: LaunchEnv, backend: str | None, timeout_s: float = 600.0) -> torch.device:
    """Process group on the chosen backend, one device per rank, megatron parallel_state (tp=pp=cp=1).

    The rendezvous store is per attempt: an in-job restart (torchrun --max-restarts) reuses the
    agent's TCP store, where the previous attempt's peer addresses remain; keying every key on
    the attempt number gives the new ranks a clean namespace.
    """
    backend, device = device_for_backend(backend)
    if device is None:
        device = set_local_device(env.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ or env.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # No device_id for NCCL: bound, every new_group would ncclCommSplit the world eagerly (all
        # ranks, every pool group); unbound, each communicator is made on its group's first collective.
        kw: dict[str, Any] = {}
        store = dist.PrefixStore(f"flexsp/attempt{env.restart_count}", _rendezvous_store(env, timeout))
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kw)
    from flexsp_patches import cpu_compat, parallel_state  # noqa: F401  (cpu_compat patches on import)

    parallel_state.install()
    return device


def set_local_device(local_rank: int) -> torch.device:
    """Bind this process to GPU ``local_rank`` (mod the visible count) before any other CUDA call.

    Why first: a CUDA call before ``set_device`` opens a context on GPU 0, ~500 MB on every rank
    of the node. Called by the cost prior's benchmark and by ``init_distributed`` (same index).
    """
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def broadcast_object(payload: Any, src: int = 0, group: Any = None) -> Any:
    """Rank ``src``'s picklable payload on every rank (returned as is without a process group or alone).

    Rank 0 decides (a plan, an error, which checkpoint to load) and the others follow: one rule for
    every such decision, so no rank acts on a payload of its own.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return payload
    box = [payload if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def shutdown_distributed() -> None:
    """Destroy the default process group if one is up; a failure here must not mask the real error."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_entrypoint(
    prog: str,
    fn: Callable[[], Any],
    user_errors: Sequence[type[BaseException]] = (),
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> int:
    """Run an entry point's body: quiet known warnings, known failures as one line, always shut down.

    ``fn`` returns an exit code (None means 0). ``user_errors`` are the exception types that mean
    "the settings or inputs are wrong" (as opposed to a bug): they print ``prog: error: ...`` on
    every rank and return 2, without a traceback. ``exit_codes`` maps other expected failures
    (too many non-finite steps, ...) to their own exit code, also one line. Anything else is a
    bug: its traceback is printed, then the same one-line summary, and the exit code is 1.
    """
    for msg in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)
    codes = {LaunchError: 2, **{e: 2 for e in user_errors}, **(exit_codes or {})}
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        rc = fn()
        return 0 if rc is None else int(rc)
    except tuple(codes) as e:
        code = next(c for t, c in codes.items() if isinstance(e, t))
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return code
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: traceback, then one line
        traceback.print_exc()
        print(f"{prog}: error: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown_distributed()
