"""Checkpoints of tensor-parallel runs (issue 20): a checkpoint written at TP t holds the whole (TP 1)
tensors, so it resumes at TP t bit for bit and at another TP size or number of units with the same
losses within 1e-5.

References, each independent of the checkpoint code: the uninterrupted run itself (its next steps'
losses), the 1-process model's tensors (``full_state_dict`` joins the TP partitions by megatron's
``partition_dim``/``partition_stride``, checked against a 1-process model in
tests/runtime/test_tensor_parallel.py), and the same training at another TP size.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.runtime.test_tensor_parallel import _cfg, _docs, _long_tail_batches, _one_group_plan

STEPS, SAVE_AT = 4, 2


def _setup(t: int, kind: str, seed: int, mode: str = "fsdp2"):
    import dataclasses

    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu", tensor_model_parallel_size=t)
    import torch.distributed as dist

    units = dist.get_world_size() // t
    model = build_gpt_model(dataclasses.replace(_cfg(t, kind), seed=seed))
    shard_model(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pool = GroupPool([tuple(range(units))], tensor_parallel_size=t)
    return model, opt, FlexSPExecutor(model, pool, sharding_mode=mode)


def _steps(model, opt, ex, t, first: int, last: int) -> list[float]:
    import torch.distributed as dist

    batches = list(zip(_long_tail_batches(STEPS), _docs(_long_tail_batches(STEPS))))
    losses = []
    for lengths, docs in batches[first:last]:
        opt.zero_grad(set_to_none=True)
        losses.append(ex.run(_one_group_plan(dist.get_world_size(), t, lengths), docs).loss)
        opt.step()
    return losses


def _train_and_save(rank, world_size, t, kind, path, fmt, mode="fsdp2"):
    """The uninterrupted run: SAVE_AT steps, a checkpoint, the rest; the saved model as 1-process tensors."""
    from megatron.flexsp.runtime.sharding import full_state_dict
    from megatron.flexsp.training import checkpointing as ckpt

    model, opt, ex = _setup(t, kind, seed=11, mode=mode)
    _steps(model, opt, ex, t, 0, SAVE_AT)
    saved = full_state_dict(model)
    if fmt == "async":  # written in the background while the next steps update the parameters in place
        saver = ckpt.DistSaver(async_save=True)
        saver.save(path, SAVE_AT, ckpt.register_core(ckpt.StateRegistry(), model, opt))
        after = _steps(model, opt, ex, t, SAVE_AT, STEPS)
        saver.wait()
        return dict(after=after, saved=saved)
    ckpt.save_checkpoint(path, SAVE_AT, model, opt, ckpt_format=fmt)
    return dict(after=_steps(model, opt, ex, t, SAVE_AT, STEPS), saved=saved)


def _resume(rank, world_size, t, kind, path, mode="fsdp2"):
    from megatron.flexsp.training import checkpointing as ckpt

    model, opt, ex = _setup(t, kind, seed=99, mode=mode)  # another init: everything must come from the checkpoint
    loaded = ckpt.load_checkpoint(path, model, opt)
    assert loaded.iteration == SAVE_AT
    return _steps(model, opt, ex, t, SAVE_AT, STEPS)


def _saved_whole(path) -> dict[str, torch.Tensor]:
    from megatron.flexsp.training import checkpointing as ckpt

    state, _ = ckpt.read_model_state(path / "iter_0000002")  # one process, no process group
    return state


def _check(path, saved, straight, resumes: dict[tuple[int, int], list[float]], exact: set[tuple[int, int]]):
    whole = _saved_whole(path)
    assert whole.keys() == saved.keys()
    for n, want in saved.items():  # the checkpoint holds the 1-process model's tensors, not one partition
        assert torch.equal(whole[n], want), n
    assert abs(straight[-1] - straight[0]) > 1e-3  # the steps trained: equal losses are not constants
    for layout, losses in resumes.items():
        if layout in exact:
            assert losses == straight, layout
        else:
            assert losses == pytest.approx(straight, rel=1e-5), layout


def test_tp2_checkpoint_resumes_at_tp2_exactly_and_at_tp1(tmp_path):
    """2 ranks (one unit of TP 2) save; resume at TP 2 bit for bit, at TP 1 on 2 ranks (FSDP2 over 2 units)
    and on 1 process within 1e-5."""
    out = run_distributed(_train_and_save, 2, 2, "gqa", tmp_path, "torch_dist", timeout=300)
    resumes = {
        (2, 2): run_distributed(_resume, 2, 2, "gqa", tmp_path, timeout=300)[0],
        (2, 1): run_distributed(_resume, 2, 1, "gqa", tmp_path, timeout=300)[0],
        (1, 1): run_distributed(_resume, 1, 1, "gqa", tmp_path, timeout=300)[0],
    }
    _check(tmp_path, out[0]["saved"], out[0]["after"], resumes, exact={(2, 2)})


@pytest.mark.slow  # four launches of 4 gloo ranks: ~1.5 min on 2 shared cores
def test_tp2_two_units_async_checkpoint_resumes_at_tp2_tp4_and_tp1(tmp_path):
    """4 ranks, TP 2 x 2 units (FSDP2 shards each partition over the units), saved in the background;
    resumed at TP 2 bit for bit, at TP 4 x 1 unit and at TP 1 x 4 within 1e-5 (8 heads in 4 kv groups)."""
    out = run_distributed(_train_and_save, 4, 2, "mha8", tmp_path, "async", timeout=400)
    resumes = {(4, t): run_distributed(_resume, 4, t, "mha8", tmp_path, timeout=400)[0] for t in (2, 4, 1)}
    _check(tmp_path, out[0]["saved"], out[0]["after"], resumes, exact={(4, 2)})


def _torch_format_save(rank, world_size, path) -> str:
    from megatron.flexsp.training import checkpointing as ckpt

    model, opt, _ = _setup(2, "gqa", seed=11)
    try:
        ckpt.save_checkpoint(path, 1, model, opt, ckpt_format="torch")
    except ckpt.CheckpointError as e:
        return str(e)
    return "saved"


def test_one_file_tp1_checkpoint_loads_at_tp2_and_a_tp2_run_refuses_to_write_one(tmp_path):
    """The torch format (whole tensors in model.pt/optim.pt, as flexsp-convert hf-to-flexsp writes): a 1-process
    TP 1 checkpoint with AdamW moments resumes at TP 2 on 2 ranks within 1e-5; a TP 2 run does not write one."""
    out = run_distributed(_train_and_save, 1, 1, "gqa", tmp_path, "torch", timeout=300)
    resumes = {(2, 2): run_distributed(_resume, 2, 2, "gqa", tmp_path, timeout=300)[0]}
    _check(tmp_path, out[0]["saved"], out[0]["after"], resumes, exact=set())
    refused = run_distributed(_torch_format_save, 2, tmp_path / "refused", timeout=300)
    assert all("torch_dist" in r and "TP 2" in r for r in refused), refused
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


@pytest.mark.parametrize("dim, stride, t", [(0, 1, 2), (0, 2, 2), (0, 2, 4), (1, 1, 4), (0, 1, 1)])
def test_boxes_cut_the_whole_tensor_as_megatron_splits_it(dim, stride, t):
    """Every (TP rank, FSDP row range) of a partition, as boxes of the whole tensor, holds exactly the local rows
    (reference: megatron's split, chunks j, j + t, ... of t * stride), and the boxes of all ranks tile the whole."""
    from megatron.flexsp.training.checkpoint_tp import boxes_of

    whole = torch.arange(8 * t * stride * 6).reshape(8 * t * stride, 6) if dim == 0 else torch.arange(6 * 8 * t)
    whole = whole.reshape(-1, 8 * t) if dim == 1 else whole
    covered = torch.zeros_like(whole)
    for j in range(t):
        part = torch.cat(torch.chunk(whole, t * stride, dim=dim)[j::t], dim=dim)
        for lo, hi in [(0, 3), (3, part.shape[0]), (2, 2)]:  # FSDP rows (dim 0), an empty shard among them
            local = part[lo:hi]
            offsets, sizes = (lo,) + (0,) * (part.dim() - 1), (hi - lo,) + tuple(part.shape[1:])
            for b in boxes_of(offsets, sizes, dim, stride, t, j, part.shape[dim]):
                src = whole[tuple(slice(o, o + n) for o, n in zip(b.offsets, b.sizes))]
                assert torch.equal(local.narrow(b.dim, b.start, b.length), src)
                covered[tuple(slice(o, o + n) for o, n in zip(b.offsets, b.sizes))] += 1
    assert bool((covered == 1).all())  # every element once: DCP's coverage check holds


@pytest.mark.slow  # three launches of 4 gloo ranks: ~1 min on 2 shared cores
def test_tp2_two_units_replicated_checkpoint_resumes_replicated_and_sharded(tmp_path):
    """Without FSDP2 (--flexsp-sharding ddp) both units hold each TP partition whole: their identical boxes are
    written once. Resumed at TP 2 replicated bit for bit, and at TP 4 with FSDP2 within 1e-5."""
    out = run_distributed(_train_and_save, 4, 2, "mha8", tmp_path, "torch_dist", "ddp", timeout=400)
    resumes = {
        (4, 2): run_distributed(_resume, 4, 2, "mha8", tmp_path, "ddp", timeout=400)[0],
        (4, 4): run_distributed(_resume, 4, 4, "mha8", tmp_path, "fsdp2", timeout=400)[0],
    }
    _check(tmp_path, out[0]["saved"], out[0]["after"], resumes, exact={(4, 2)})
