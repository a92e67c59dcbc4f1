"""tests/dist_utils.run_distributed: results by rank, child tracebacks, hangs and crashes bounded."""

import os
import time

import pytest
import torch

from tests.dist_utils import DistRunError, run_distributed


def _allreduce(rank, ws, n):
    t = torch.full((n,), float(rank))
    torch.distributed.all_reduce(t)
    return t, torch.distributed.get_rank(), torch.distributed.get_world_size()


def _raise_on_rank1(rank, ws):
    if rank == 1:
        raise ValueError("boom on rank 1")
    torch.distributed.barrier()  # rank 0 would wait forever without the parent's kill


def _rank0_hangs(rank, ws):
    if rank == 0:
        time.sleep(600)
    return rank


def _rank1_dies(rank, ws):
    if rank == 1:
        os._exit(3)
    time.sleep(600)


def test_results_ordered_by_rank():
    out = run_distributed(_allreduce, 3, 2, timeout=60)
    expected = float(sum(range(3)))
    for r, (t, dist_rank, dist_ws) in enumerate(out):
        assert torch.equal(t, torch.full((2,), expected))
        assert (dist_rank, dist_ws) == (r, 3)


def test_child_exception_text_reaches_parent():
    t0 = time.monotonic()
    with pytest.raises(DistRunError, match="rank 1 failed:(.|\n)*ValueError: boom on rank 1"):
        run_distributed(_raise_on_rank1, 2, timeout=60)
    assert time.monotonic() - t0 < 60  # failed on the first error, not at the deadline


def test_hang_is_killed_at_deadline():
    with pytest.raises(DistRunError, match=r"timed out after 4s; ranks \[0\] did not finish"):
        run_distributed(_rank0_hangs, 2, timeout=4)


def test_silent_crash_is_reported():
    with pytest.raises(DistRunError, match="rank 1 exited with code 3"):
        run_distributed(_rank1_dies, 2, timeout=60)


def _world_size(rank, ws):
    return torch.distributed.get_world_size()


def test_port_taken_in_between_is_retried(monkeypatch):
    import socket

    import tests.dist_utils as du

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    ports = [taken.getsockname()[1]]  # first attempt gets a port someone else holds
    real = du.free_port
    monkeypatch.setattr(du, "free_port", lambda: ports.pop() if ports else real())
    try:
        assert run_distributed(_world_size, 2, timeout=60) == [2, 2]
    finally:
        taken.close()
    assert not ports


def _child_of_rank(rank, ws):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_put_square, args=(q, rank))
    p.start()
    v = q.get(timeout=60)
    p.join(timeout=30)
    return v


def _put_square(q, x):
    q.put(x * x)


def test_ranks_may_start_their_own_processes():
    assert run_distributed(_child_of_rank, 2, timeout=90) == [0, 1]


def _inherited_state(rank, ws):
    """What a rank holds before it imports anything itself (this module imports no megatron)."""
    import multiprocessing as mp
    import sys

    return (
        mp.get_start_method(allow_none=True),
        "megatron.core" in sys.modules,
        "transformer_engine" in sys.modules,
        torch.cuda.is_initialized(),
    )


def test_nccl_ranks_are_spawned_and_the_fork_server_preloads_torch_only(monkeypatch):
    """Issue 10 item 1: nothing that can initialise CUDA may reach a forked rank."""
    import tests.dist_utils as du

    assert du.context_for("nccl").get_start_method() == "spawn"
    gloo = du.context_for("gloo").get_start_method()
    assert gloo in ("forkserver", "spawn")
    assert not any(m.split(".")[0] == "megatron" for m in du.FORKSERVER_PRELOAD)
    for start, megatron_loaded, te_loaded, cuda_initialised in run_distributed(_inherited_state, 2, timeout=60):
        assert start == gloo and not megatron_loaded and not te_loaded and not cuda_initialised
    # the spawn path end to end (what an NCCL run takes), exercised on gloo
    spawn = du.context_for("nccl")
    monkeypatch.setattr(du, "context_for", lambda backend: spawn)
    for start, megatron_loaded, te_loaded, cuda_initialised in run_distributed(_inherited_state, 2, timeout=90):
        assert start == "spawn" and not megatron_loaded and not te_loaded and not cuda_initialised
