"""The torch_dist checkpoint format (DCP): each rank writes its own FSDP2 shards (sync and async);
resumed on the same ranks it continues bit for bit, on fewer ranks it sees the same batches with
losses within 1e-5 of the uninterrupted run; a damaged shard falls back to the previous checkpoint;
DCP's pickled metadata goes through an allow-list; NaN is refused on every rank."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from megatron.flexsp.training import checkpointing as ckpt
from megatron.flexsp.training.optimizer import build_optimizer
from tests.dist_utils import run_distributed
from tests.training.test_checkpointing import CFG, _model, _shard, _step

SAMPLER = {"next_batch": 2, "seed": 5}


def _registry(m, opt, sched, sampler):
    reg = ckpt.register_core(ckpt.StateRegistry(), m, opt, sched)
    box = ckpt.ValueBox(sampler)
    reg.register("sampler", box.state_dict, box.load_state_dict)
    return reg


def _save_then_resume(rank, world_size, tmp, async_save):
    """Uninterrupted: 5 steps, checkpoints at 1 (save_checkpoint) and 2 (DistSaver, maybe in the background,
    overlapping steps 3-5); then a fresh model resumes from 2 in the same processes."""
    m = _shard(_model(0), world_size)
    opt, sched = build_optimizer(m, CFG)
    for it in range(2):
        if it == 1:
            ckpt.save_checkpoint(tmp, 1, m, opt, sched, states={"sampler": {"next_batch": 1}}, ckpt_format="torch_dist")
        _step(m, opt, sched, it, rank, world_size)
    saver = ckpt.DistSaver(async_save=async_save)
    saver.save(tmp, 2, _registry(m, opt, sched, dict(SAMPLER)), args={"global_batch_size": 8})
    in_flight = saver.in_flight
    straight = [_step(m, opt, sched, it, rank, world_size) for it in range(2, 5)]  # overlaps an async write
    saver.wait()
    return straight, in_flight, _resume(rank, world_size, tmp)


def _resume(rank, world_size, tmp):
    m = _shard(_model(7), world_size)  # another init: everything must come from the checkpoint
    opt, sched = build_optimizer(m, CFG)
    torch.manual_seed(999)
    loaded = ckpt.load_checkpoint(tmp, m, opt, sched)
    resumed = [_step(m, opt, sched, it, rank, world_size) for it in range(2, 5)]
    return loaded.iteration, loaded.states.get("sampler"), sched.num_steps, resumed, loaded.warnings


def _check_layout(tmp: Path, world_size: int) -> None:
    d = tmp / "iter_0000002"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["format_version"] == 3 and meta["ckpt_format"] == "torch_dist" and meta["world_size"] == world_size
    shards = sorted(p.name for p in (d / "dist").iterdir() if p.suffix == ".distcp")
    assert len(shards) == world_size  # one shard file per rank: nothing gathered to rank 0
    ranks = {f"rank_{r:05d}.pt" for r in range(world_size)}
    assert set(meta["files"]) == {f"dist/{n}" for n in shards} | {"dist/.metadata", "trainer.pt"} | ranks
    for name, rec in meta["files"].items():  # every file's checksum, written by whichever rank hashed it
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == rec["sha256"]
    assert not (d / "model.pt").exists() and not (d / "optim.pt").exists()
    assert meta["model_signature"] == {"0.weight": [10, 6], "0.bias": [10], "2.weight": [3, 10], "2.bias": [3]}
    assert (tmp / "latest").read_text().strip() == "iter_0000002"
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def _check_resharded(rows, straight, world_size) -> None:
    for it, sampler, steps, resumed, warnings in rows:
        assert (it, sampler, steps) == (2, SAMPLER, 5)  # global states: the same batches, the same schedule
        assert _close(resumed[0][0], straight[0][0], 1e-5), (world_size, resumed, straight)
        assert all(_close(a[0], b[0], 1e-4) for a, b in zip(resumed, straight))
        assert any(f"ranks; this run has {world_size}: model and optimizer are resharded" in w for w in warnings)


def test_two_ranks_async_save_resumes_exactly_and_on_one_rank(tmp_path):
    out = run_distributed(_save_then_resume, 2, str(tmp_path), True, timeout=240)
    straight = out[0][0]
    _check_layout(tmp_path, 2)
    for s, in_flight, (it, sampler, steps, resumed, warnings) in out:
        assert s == straight and in_flight  # the write ran in the background, overlapping steps 3-5
        assert (it, sampler, steps) == (2, SAMPLER, 5)
        assert resumed == straight and warnings == []  # bit for bit, RNG draws included
    _check_resharded([_resume(0, 1, str(tmp_path))], straight, 1)
    # a flipped byte in one rank's shard: the load falls back to iteration 1, naming the damaged file
    shard = tmp_path / "iter_0000002" / "dist" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x08
    shard.write_bytes(bytes(data))
    m = _model(3)
    opt, sched = build_optimizer(m, CFG)
    loaded = ckpt.load_checkpoint(tmp_path, m, opt, sched)
    assert loaded.iteration == 1 and loaded.states["sampler"] == {"next_batch": 1}
    assert loaded.fallback_from == tmp_path / "iter_0000002"
    assert "dist/__1_0.distcp fails its sha256 check" in loaded.warnings[0]


@pytest.mark.slow  # process groups of 4 and 2 gloo ranks: 1-2 min on 2 shared cores
def test_save_on_4_resume_on_4_2_1(tmp_path):
    out = run_distributed(_save_then_resume, 4, str(tmp_path), False, timeout=300)
    straight = out[0][0]
    _check_layout(tmp_path, 4)
    for s, in_flight, (it, sampler, steps, resumed, warnings) in out:
        assert s == straight and not in_flight
        assert (it, sampler, steps) == (2, SAMPLER, 5) and resumed == straight and warnings == []
    _check_resharded(run_distributed(_resume, 2, str(tmp_path), timeout=300), straight, 2)
    _check_resharded([_resume(0, 1, str(tmp_path))], straight, 1)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_with_a_foreign_global_is_refused_and_nan_is_never_written(tmp_path):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    _step(m, opt, sched, 0, 0, 1)
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched, ckpt_format="torch_dist")
    state, meta = ckpt.read_model_state(tmp_path)  # one process, no model: read from the shards
    assert meta["format_version"] == 3 and all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    # someone else's checkpoint, consistent checksums and all, whose DCP metadata would run a command
    d = tmp_path / "iter_0000001"
    (d / "dist" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    meta["files"]["dist/.metadata"] = {
        "sha256": hashlib.sha256((d / "dist" / ".metadata").read_bytes()).hexdigest(),
        "bytes": (d / "dist" / ".metadata").stat().st_size,
    }
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="references posix.system"):
        ckpt.load_checkpoint(tmp_path, m, opt, sched)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="DCP metadata refused"):
        ckpt.read_model_state(tmp_path)
    with torch.no_grad():
        m[2].bias[1] = float("nan")
    with pytest.raises(ckpt.NonFiniteCheckpointError, match=r"model\.2\.bias"):
        ckpt.save_checkpoint(tmp_path, 2, m, opt, sched, ckpt_format="torch_dist")
    assert not (tmp_path / "iter_0000002").exists() and (tmp_path / "latest").read_text().strip() == "iter_0000001"


def test_retention_and_resaving_an_iteration_keep_the_shard_directory_whole(tmp_path):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    for it in (1, 2, 3):
        _step(m, opt, sched, it, 0, 1)
        ckpt.save_checkpoint(tmp_path, it, m, opt, sched, keep_latest_k=2, ckpt_format="torch_dist")
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    _step(m, opt, sched, 4, 0, 1)
    ckpt.save_checkpoint(tmp_path, 3, m, opt, sched, keep_latest_k=2, ckpt_format="torch_dist")  # staged, linked
    assert ckpt.verify_checkpoint(tmp_path / "iter_0000003") == []  # dist/ came through the hard-link copy
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "staged" in p.name] == []
    m2 = _model(5)
    opt2, sched2 = build_optimizer(m2, CFG)
    assert ckpt.load_checkpoint(tmp_path, m2, opt2, sched2).iteration == 3
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
