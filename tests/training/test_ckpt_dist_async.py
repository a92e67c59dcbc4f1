"""--async-save: the write overlaps training yet holds the state of the save's moment; at most one
save is in flight; a failure in the background surfaces at the next poll with `latest` untouched;
a rank killed while a background write is under way leaves the previous checkpoint as `latest`."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron.flexsp.training import checkpoint_dist_writer as writer
from megatron.flexsp.training import checkpointing as ckpt
from megatron.flexsp.training.optimizer import build_optimizer
from tests.dist_utils import DistRunError, run_distributed
from tests.training.test_checkpointing import CFG, _model, _shard, _step


def _registry(m, opt, sched):
    return ckpt.register_core(ckpt.StateRegistry(), m, opt, sched)


def _slow_writes(monkeypatch, seconds: float) -> list[float]:
    """Every DCP write takes ``seconds`` longer; returns the times each write finished."""
    real, done = writer.write_shards, []

    def slow(*a, **kw):
        time.sleep(seconds)
        real(*a, **kw)
        done.append(time.monotonic())

    monkeypatch.setattr(writer, "write_shards", slow)
    return done


def test_background_write_holds_the_saved_moment_one_at_a_time_and_reports_errors(tmp_path, monkeypatch):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    _step(m, opt, sched, 0, 0, 1)
    threads_before = threading.active_count()  # other tests of the session may leave threads behind
    saver = ckpt.DistSaver(async_save=True)
    finished = _slow_writes(monkeypatch, 0.6)
    saver.save(tmp_path, 1, _registry(m, opt, sched))
    assert saver.in_flight and saver.blocked_s < 0.5  # training was not held for the write
    at_save = {k: v.clone() for k, v in m.state_dict().items()}
    _step(m, opt, sched, 1, 0, 1)  # training goes on and changes the weights in place meanwhile
    t0 = time.monotonic()
    saver.save(tmp_path, 2, _registry(m, opt, sched))  # waits for save 1 first: one staged copy at a time
    assert finished and finished[0] <= time.monotonic() and (tmp_path / "iter_0000001" / "meta.json").exists()
    assert time.monotonic() - t0 >= 0.3 and threading.active_count() <= threads_before + 1  # one writer
    assert saver.wait() == tmp_path / "iter_0000002"
    state, meta = ckpt.read_model_state(tmp_path / "iter_0000001")
    assert meta["iteration"] == 1 and all(torch.equal(state[k], v) for k, v in at_save.items())
    assert not all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    # an error in the background: raised by the next poll, nothing installed, `latest` unchanged
    monkeypatch.setattr(
        writer, "write_shards", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk full (simulated)"))
    )
    saver.save(tmp_path, 3, _registry(m, opt, sched))
    with pytest.raises(
        ckpt.CheckpointError, match=r"saving checkpoint .*iter_0000003 failed: rank 0: OSError: disk full"
    ):
        for _ in range(200):
            saver.poll()
            time.sleep(0.01)
    assert not saver.in_flight and (tmp_path / "latest").read_text().strip() == "iter_0000002"
    assert not (tmp_path / "iter_0000003").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _killed_during_async_save(rank, world_size, tmp):
    m = _shard(_model(0), world_size)
    opt, sched = build_optimizer(m, CFG)
    _step(m, opt, sched, 0, rank, world_size)
    saver = ckpt.DistSaver(async_save=True)
    saver.prepare()
    saver.save(tmp, 1, _registry(m, opt, sched))
    saver.wait()
    real = writer.write_shards

    def dies_after_its_shards(*a, **kw):
        real(*a, **kw)  # every rank's shards are on disk ...
        if rank == 1:
            os._exit(9)  # ... and rank 1 is killed before the checkpoint is complete

    writer.write_shards = dies_after_its_shards
    _step(m, opt, sched, 1, rank, world_size)
    saver.save(tmp, 2, _registry(m, opt, sched))
    for it in range(2, 40):  # training goes on until the dead rank takes the job down
        _step(m, opt, sched, it, rank, world_size)
        saver.poll()
        time.sleep(0.05)
    return "not killed"


@pytest.mark.slow  # a process group killed mid-save, then a resume: ~30 s on 2 cores
def test_a_rank_killed_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    with pytest.raises(DistRunError):  # rank 1 died; rank 0 fails on the closed connection
        run_distributed(_killed_during_async_save, 2, str(tmp_path), timeout=120)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "iter_0000002").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-iter_0000002")]  # the unfinished write, hidden
    m = _model(5)
    opt, sched = build_optimizer(m, CFG)
    loaded = ckpt.load_checkpoint(tmp_path, m, opt, sched)
    assert loaded.iteration == 1 and loaded.warnings == [
        f"checkpoint {Path(tmp_path) / 'iter_0000001'} was written by 2 ranks; this run has 1: model and optimizer are resharded and the data position and planner are global (same batches), but per-rank RNG cannot be mapped: every rank keeps its generators as seeded from --seed"
    ]
    ckpt.save_checkpoint(tmp_path, 2, m, opt, sched, ckpt_format="torch_dist")  # the next save clears the leftovers
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
