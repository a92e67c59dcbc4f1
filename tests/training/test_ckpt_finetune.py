"""--finetune (weights only, iteration 0, everything else fresh) and ``read_model_state`` (the
exporters' one-process reader), against the model they were saved from."""

from __future__ import annotations

import json

import pytest
import torch

from megatron.flexsp.training import arguments as A
from megatron.flexsp.training import checkpointing as ckpt
from megatron.flexsp.training.checkpointer import Checkpointer
from megatron.flexsp.training.configs import CheckpointConfig, OptimizerConfig
from megatron.flexsp.training.core_state import register_core
from megatron.flexsp.training.optimizer import build_optimizer
from megatron.flexsp.training.state_registry import StateRegistry, ValueBox
from tests.dist_utils import run_distributed

CFG = OptimizerConfig(lr=0.05, weight_decay=0.1, adam_beta2=0.95, lr_warmup_iters=1, lr_decay_iters=6)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 2))


def _trained(seed: int, steps: int = 2):
    m = _model(seed)
    opt, sched = build_optimizer(m, CFG)
    for _ in range(steps):
        m(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return m, opt, sched


def test_read_model_state_is_the_saved_model_and_skips_a_damaged_newest(tmp_path):
    m = _model(0)
    ckpt.save_checkpoint(tmp_path, 1, m, None)  # model-only: optimizer=None, one process, torch format
    first = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ckpt.save_checkpoint(tmp_path, 2, m, None)
    state, meta = ckpt.read_model_state(tmp_path)
    assert meta["iteration"] == 2 and set(state) == set(m.state_dict())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    state1, meta1 = ckpt.read_model_state(tmp_path / "iter_0000001")  # a checkpoint directory itself
    assert meta1["iteration"] == 1 and all(torch.equal(state1[k], v) for k, v in first.items())
    f = tmp_path / "iter_0000002" / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    state, meta = ckpt.read_model_state(tmp_path)  # the newest that verifies, as a resume would choose
    assert meta["iteration"] == 1 and all(torch.equal(state[k], v) for k, v in first.items())
    with pytest.raises(ckpt.CheckpointError, match="fails its sha256"):
        ckpt.read_model_state(tmp_path / "iter_0000002")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_model_state(tmp_path / "nope")


def _registry(m, opt, sched, sampler: ValueBox) -> StateRegistry:
    reg = register_core(StateRegistry(), m, opt, sched)
    reg.register("sampler", sampler.state_dict, sampler.load_state_dict)
    return reg


def test_finetune_takes_the_weights_alone_at_iteration_0(tmp_path):
    src, _, _ = _trained(0)
    base = tmp_path / "base"
    ckpt.save_checkpoint(base, 7, src, None, args={"global_batch_size": 99, "lr": 1.0})
    m, opt, sched = _trained(5, steps=0)
    torch.manual_seed(1234)
    want_rng = torch.get_rng_state()
    sampler = ValueBox({"next_batch": 0})
    cfg = CheckpointConfig(load=str(base), save=str(tmp_path / "out"), finetune=True)
    # another batch size and LR than the base run: a fine-tune is a new run, nothing is compared
    run = {"global_batch_size": 8, "lr": 0.05}
    saver = Checkpointer(cfg, _registry(m, opt, sched, sampler), run_record=run, train_iters=4)
    loaded = saver.resume()
    assert loaded is not None and loaded.iteration == 0 and loaded.states == {}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values()))
    assert opt.state_dict()["state"] == {} and sched.num_steps == 0  # fresh optimizer and LR schedule
    assert sampler.value == {"next_batch": 0} and not sampler.loaded
    assert torch.equal(torch.get_rng_state(), want_rng)  # RNG as this run seeded it
    assert saver.last_saved is None
    # the fine-tuning run saves; its relaunch resumes that checkpoint in full, not the base weights again
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    sampler.value = {"next_batch": 1}
    saver.save(1)
    m2, opt2, sched2 = _trained(9, steps=0)
    sampler2 = ValueBox()
    again = Checkpointer(cfg, _registry(m2, opt2, sched2, sampler2), run_record=run, train_iters=4).resume()
    assert again.iteration == 1 and sampler2.value == {"next_batch": 1} and sched2.num_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def _save_on_two(rank, world_size, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m, opt, sched = _trained(0)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(m, mesh=mesh)
    opt, sched = build_optimizer(m, CFG)
    for fmt in ("torch", "torch_dist"):
        ckpt.save_checkpoint(f"{out}/{fmt}", 3, m, opt, sched, states={"sampler": {"next_batch": 3}}, ckpt_format=fmt)


def test_finetune_and_read_model_state_accept_a_checkpoint_of_another_world_size(tmp_path):
    run_distributed(_save_on_two, 2, str(tmp_path), timeout=120)
    src, _, _ = _trained(0)
    for fmt in ("torch", "torch_dist"):
        m, opt, sched = _trained(4, steps=0)
        cfg = CheckpointConfig(load=str(tmp_path / fmt), finetune=True)
        loaded = Checkpointer(cfg, _registry(m, opt, sched, ValueBox()), run_record={}, train_iters=4).resume()
        meta = json.loads((tmp_path / fmt / "iter_0000003" / "meta.json").read_text())
        assert loaded.iteration == 0 and meta["world_size"] == 2 and loaded.warnings == []
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values())), fmt
        assert opt.state_dict()["state"] == {}
        state, meta2 = ckpt.read_model_state(tmp_path / fmt)  # the exporters' reader, one process
        assert meta2 == meta and set(state) == set(src.state_dict())
        assert all(torch.equal(state[k], v) for k, v in src.state_dict().items()), fmt


def test_finetune_without_load_is_one_line():
    args = A.parse_args(["--finetune"])
    with pytest.raises(A.ArgumentError, match="--finetune needs --load"):
        A.validate_args(args, 1, has_cuda=False)
    A.validate_args(A.parse_args(["--finetune", "--load", "x"]), 1, has_cuda=False)
