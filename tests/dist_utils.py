"""Run a function on N torch.distributed processes from a pytest test, bounded in time.

Why: multi-process tests must never hang CI, must show the failing rank's traceback in the
pytest report, and must not collide on ports when several test files run at once.

Usage (``fn`` must be a module-level function so it can be pickled by reference)::

    from tests.dist_utils import run_distributed

    def _body(rank: int, world_size: int, n: int) -> float:
        t = torch.full((n,), float(rank))
        torch.distributed.all_reduce(t)          # process group is already initialised
        return t.sum().item()                    # any picklable value (tensors are fine)

    def test_something():
        results = run_distributed(_body, 4, 3, timeout=60)   # list ordered by rank
        assert results == [18.0] * 4

Several cases should share one call (one process group per test function): starting
processes that import torch costs seconds on a 2-core CI machine.

Expected errors: catch them inside ``fn`` and return the message, then assert on the returned
list in the parent (an exception escaping ``fn`` fails the whole run, by design).

Mechanics: gloo runs take processes from a ``forkserver`` context whose server pre-imports
torch once per pytest session, so later runs start fast; each run gets a fresh free port (TCP
store on 127.0.0.1) and a process-group timeout; the parent waits for results with a deadline,
kills every child on timeout or on the first failure, and raises with the child's traceback.

CUDA and forking: a process that forks after CUDA was initialised hands its children a CUDA
state they cannot use ("Cannot re-initialize CUDA in forked subprocess"). The fork server
therefore pre-imports only torch and torch.distributed (they do not initialise CUDA), never
megatron.core: through megatron.core.distributed -> megatron_fsdp it imports Transformer
Engine, whose attention backends query the device's compute capability at import time when
flash-attn is installed. NCCL runs use ``spawn`` (fresh interpreters, nothing inherited).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from megatron.flexsp.launching import free_port

__all__ = ["DistRunError", "FORKSERVER_PRELOAD", "context_for", "free_port", "run_distributed"]

# Modules the fork server imports once; none of them may initialise CUDA (see the module docstring).
FORKSERVER_PRELOAD = ("torch", "torch.distributed")
_CTX: dict[str, Any] = {}
# Same filter as pytest.ini; children and the fork server do not inherit pytest's filters.
_QUIET = "ignore:Transformer Engine and Apex are not installed"


class DistRunError(RuntimeError):
    """A rank raised, crashed, or did not finish in time; the message carries the details."""


def context_for(backend: str):
    """The multiprocessing context for ranks of ``backend``: ``spawn`` for NCCL (CUDA must never be
    inherited through a fork), else a fork server that pre-imports torch (fast starts on gloo)."""
    method = "spawn" if backend == "nccl" or "forkserver" not in mp.get_all_start_methods() else "forkserver"
    if method not in _CTX:
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
            from multiprocessing import forkserver

            saved = os.environ.get("PYTHONWARNINGS")
            os.environ["PYTHONWARNINGS"] = ",".join(x for x in (saved, _QUIET) if x)
            try:
                forkserver.ensure_running()  # started now, with the quiet filter in its environment
            finally:
                if saved is None:
                    del os.environ["PYTHONWARNINGS"]
                else:
                    os.environ["PYTHONWARNINGS"] = saved
        _CTX[method] = ctx
    return _CTX[method]


def _child(fn, rank, world_size, args, kwargs, port, backend, pg_timeout_s, threads, env, result_q):
    """Entry point of one rank: init the process group, run fn, report (rank, ok, payload)."""
    try:
        os.environ.update(env)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        os.environ["RANK"] = str(rank)
        os.environ["LOCAL_RANK"] = str(rank)
        os.environ["WORLD_SIZE"] = str(world_size)
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import warnings

        # Same filter as pytest.ini (children do not inherit pytest's warning filters).
        warnings.filterwarnings("ignore", message=_QUIET.split(":", 1)[1])
        import torch
        import torch.distributed as dist

        if threads:
            torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        out = fn(rank, world_size, *args, **kwargs)
        payload = pickle.dumps(out)  # plain pickle: tensors are copied, no shared-memory handles
        result_q.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        # Report before tearing anything down, so the root cause reaches the parent before the
        # peers' secondary "connection closed" errors.
        result_q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort teardown
            pass


def _failure_text(fn, rank: int, tb: str, result_q, grace_s: float = 1.0) -> str:
    """First failure first; other ranks' failures that arrive within grace_s are appended
    (a peer's crash often makes the others fail too, and the order of reports is not causal)."""
    parts = [f"run_distributed({getattr(fn, '__name__', fn)}): rank {rank} failed:\n{tb}"]
    end = time.monotonic() + grace_s
    while (left := end - time.monotonic()) > 0:
        try:
            r, ok, payload = result_q.get(timeout=left)
        except queue.Empty:
            break
        if not ok:
            parts.append(f"rank {r} failed too:\n{payload}")
    return "\n".join(parts)


def _kill_all(procs: Sequence[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    pg_timeout: float | None = None,
    threads: int = 1,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return results by rank.

    * ``timeout``: wall-clock seconds for the whole run (process start included); on expiry
      every child is killed and DistRunError names the ranks that did not finish.
    * ``pg_timeout``: torch.distributed timeout for init and collectives (default: ``timeout``).
    * ``threads``: torch intra-op threads per child (1 keeps N processes from fighting over cores).
    * ``env``: extra environment variables set in every child before torch.distributed starts.
    * The first rank that raises (or dies) fails the run at once, with its traceback.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    for attempt in range(2):
        try:
            return _run_once(fn, world_size, args, kwargs, timeout, backend, pg_timeout, threads, env)
        except DistRunError as e:
            # The free port can be taken between free_port() and the store's bind by another
            # test running concurrently: retry once on a fresh port, never for other failures.
            if attempt == 0 and ("Address already in use" in str(e) or "EADDRINUSE" in str(e)):
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _run_once(fn, world_size, args, kwargs, timeout, backend, pg_timeout, threads, env) -> list[Any]:
    ctx = context_for(backend)
    result_q = ctx.Queue()
    port = free_port()
    pg_timeout_s = float(pg_timeout if pg_timeout is not None else timeout)
    procs = []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(
                    fn,
                    rank,
                    world_size,
                    args,
                    kwargs,
                    port,
                    backend,
                    pg_timeout_s,
                    threads,
                    dict(env or {}),
                    result_q,
                ),
                daemon=False,  # ranks may start processes of their own (e.g. the planner hook); we kill them below
                name=f"dist-rank{rank}",
            )
            p.start()
            procs.append(p)
        results: dict[int, Any] = {}
        dead_since: dict[int, float] = {}
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise DistRunError(
                    f"run_distributed({getattr(fn, '__name__', fn)}): timed out after {timeout:.0f}s; "
                    f"ranks {missing} did not finish (all children killed)"
                )
            try:
                rank, ok, payload = result_q.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                # A child that died without reporting (segfault, os._exit, OOM kill): give its
                # queue item a moment to arrive, then fail instead of waiting for the deadline.
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if r not in results and p.exitcode is not None:
                        first = dead_since.setdefault(r, now)
                        if now - first > 2.0:
                            raise DistRunError(
                                f"run_distributed({getattr(fn, '__name__', fn)}): rank {r} exited with code "
                                f"{p.exitcode} without reporting a result"
                            ) from None
                continue
            if not ok:
                raise DistRunError(_failure_text(fn, rank, payload, result_q))
            results[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [results[r] for r in range(world_size)]
    finally:
        _kill_all(procs)
        result_q.close()
        result_q.join_thread()
