"""Checkpoints: exact resume on FSDP2 (gloo), atomic save under a crash, clear errors on mismatch."""

from __future__ import annotations

import pytest
import torch

from megatron.flexsp.training import checkpointing as ckpt
from megatron.flexsp.training.arguments import OptimizerConfig
from megatron.flexsp.training.optimizer import build_optimizer, clip_grad_norm
from tests.dist_utils import run_distributed

CFG = OptimizerConfig(lr=0.05, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                      clip_grad=1.0, lr_warmup_iters=1, lr_decay_iters=6, lr_decay_style="cosine")


def _model(seed: int, hidden: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 3))


def _shard(m, world_size, fsdp=True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if world_size == 1:
        return m
    if not fsdp:  # replicated parameters, gradients all-reduced (the runtime's ddp mode)
        def hook(p):
            torch.distributed.all_reduce(p.grad)
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(hook)
        return m
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    for mod in (m, m[0], m[2]):
        mod.set_gradient_divide_factor(1.0)
        mod.set_force_sum_reduction_for_comms(True)
    return m


def _step(m, opt, sched, it, rank, world_size):
    g = torch.Generator().manual_seed(100 + it)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    per = 8 // world_size
    sl = slice(rank * per, (rank + 1) * per)
    noise = torch.rand(()).item()  # consumes the torch RNG: resume must restore it
    loss = ((m(x[sl]) - y[sl]) ** 2).sum() / 8 * (1.0 + 0.0 * noise)
    loss.backward()
    clip_grad_norm(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()
    sched.set_for_next_step()
    t = loss.detach().clone()
    if world_size > 1:
        torch.distributed.all_reduce(t)
    return t.item(), noise


def _resume_body(rank, world_size, tmp, fsdp=True):
    m = _shard(_model(0), world_size, fsdp)
    opt, sched = build_optimizer(m, CFG)
    for it in range(2):
        _step(m, opt, sched, it, rank, world_size)
    ckpt.save_checkpoint(tmp, 2, m, opt, sched, sampler_state={"next_batch": 2}, planner_state={"p": 1})
    straight = [_step(m, opt, sched, it, rank, world_size) for it in range(2, 5)]

    m2 = _shard(_model(7), world_size, fsdp)  # different init: everything must come from the checkpoint
    opt2, sched2 = build_optimizer(m2, CFG)
    torch.manual_seed(999)
    loaded = ckpt.load_checkpoint(tmp, m2, opt2, sched2)
    resumed = [_step(m2, opt2, sched2, it, rank, world_size) for it in range(2, 5)]

    errors = []
    bad = _shard(_model(0, hidden=12), world_size, fsdp)
    bopt, bsched = build_optimizer(bad, CFG)
    try:
        ckpt.load_checkpoint(tmp, bad, bopt, bsched)
    except ckpt.CheckpointError as e:
        errors.append(str(e))
    return straight, resumed, loaded.iteration, loaded.sampler, loaded.planner, sched2.num_steps, errors


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "replicated"])
def test_resume_is_exact_and_mismatch_is_clear(tmp_path, fsdp):
    out = run_distributed(_resume_body, 2, str(tmp_path), fsdp, timeout=180)
    for straight, resumed, it, sampler, planner, steps, errors in out:
        assert resumed == straight  # bit-identical losses and RNG draws
        assert (it, sampler, planner, steps) == (2, {"next_batch": 2}, {"p": 1}, 5)
        assert len(errors) == 1 and "shape mismatch" in errors[0] and "0.weight" in errors[0]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    # a checkpoint of 2 ranks does not load into 1 process
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    with pytest.raises(ckpt.CheckpointError, match="written by 2 ranks; this run has 1"):
        ckpt.load_checkpoint(tmp_path, m, opt, sched)


def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    _step(m, opt, sched, 0, 0, 1)
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    _step(m, opt, sched, 1, 0, 1)

    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        if str(f).endswith("optim.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, m, opt, sched)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "iter_0000002").exists()
    m2 = _model(5)
    opt2, sched2 = build_optimizer(m2, CFG)
    assert ckpt.load_checkpoint(tmp_path, m2, opt2, sched2).iteration == 1
    for k, v in good.items():
        assert torch.equal(m2.state_dict()[k], v)
    # re-saving the same iteration replaces it atomically
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    assert ckpt.find_checkpoint(tmp_path).name == "iter_0000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_checkpoint_errors(tmp_path):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope", m, opt, sched)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint there"):
        ckpt.load_checkpoint(tmp_path, m, opt, sched)
    (tmp_path / "latest").write_text("iter_0000042\n")
    with pytest.raises(ckpt.CheckpointError, match="missing or incomplete"):
        ckpt.load_checkpoint(tmp_path, m, opt, sched)
