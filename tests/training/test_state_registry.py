"""The resumable-state registry: one registration per component, its place in the checkpoint,
megatron's RNG tracker round-tripping (issue 17, item 4), the calibrated cost model written at
every checkpoint, and the one error relay."""

from __future__ import annotations

import pytest
import torch

from megatron.flexsp.training import checkpointing as ckpt
from megatron.flexsp.training.checkpoint_format import ERRORS
from megatron.flexsp.training.checkpointer import Checkpointer
from megatron.flexsp.training.configs import CheckpointConfig, OptimizerConfig
from megatron.flexsp.training.core_state import register_core
from megatron.flexsp.training.error_relay import relay_error
from megatron.flexsp.training.optimizer import build_optimizer
from megatron.flexsp.training.rng_state import rng_state
from megatron.flexsp.training.state_registry import Scope, ShardedForm, StateRegistry, ValueBox
from tests.dist_utils import run_distributed

# only what differs from OptimizerConfig's defaults (min_lr 0, beta1 0.9, eps 1e-8, clip 1.0, cosine)
CFG = OptimizerConfig(lr=0.05, weight_decay=0.1, adam_beta2=0.95, lr_warmup_iters=1, lr_decay_iters=6)


def _one(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 2))
    opt, sched = build_optimizer(m, CFG)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return m, opt, sched


def test_one_registration_is_saved_and_restored_at_its_key(tmp_path):
    """Adding a component is one register call: the checkpointer saves it and gives it back."""
    m, opt, sched = _one()
    reg = register_core(StateRegistry(), m, opt, sched)
    counter = ValueBox({"seen": 7})
    reg.register("counter", counter.state_dict, counter.load_state_dict, key=("extra", "counter"))
    cfg = CheckpointConfig(save=str(tmp_path), load=str(tmp_path), ckpt_format="torch")  # the trainer.pt layout
    saver = Checkpointer(cfg, reg, run_record={}, train_iters=4)
    saver.save(2)
    trainer = torch.load(tmp_path / "iter_0000002" / "trainer.pt", weights_only=False)
    assert trainer["extra"]["counter"] == {"seen": 7} and trainer["iteration"] == 2
    assert isinstance(trainer["rng"], list) and set(trainer["rng"][0]) >= {"python", "numpy", "torch"}
    m2, opt2, sched2 = _one(3)
    back = ValueBox()
    reg2 = register_core(StateRegistry(), m2, opt2, sched2)
    reg2.register("counter", back.state_dict, back.load_state_dict, key=("extra", "counter"))
    missing = ValueBox("fresh")  # a component newer than the checkpoint keeps its fresh state
    reg2.register("newer", missing.state_dict, missing.load_state_dict)
    loaded = Checkpointer(CheckpointConfig(load=str(tmp_path)), reg2, run_record={}, train_iters=4).resume()
    assert loaded.iteration == 2 and back.value == {"seen": 7} and loaded.states["counter"] == {"seen": 7}
    assert missing.value == "fresh" and not missing.loaded and "newer" not in loaded.states
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert sched2.state_dict() == sched.state_dict()


def test_registry_refuses_overlapping_places():
    reg = StateRegistry()
    reg.register("extra", dict, print)
    with pytest.raises(ValueError, match="overlaps"):
        reg.register("calibration", dict, print, key=("extra", "calibration"))
    with pytest.raises(ValueError, match="twice"):
        reg.register("extra", dict, print, key=("other",))
    with pytest.raises(ValueError, match="give it a key"):
        reg.register("whole", dict, print, key=())
    assert reg["extra"].scope is Scope.GLOBAL and reg["extra"].address == "trainer.pt/extra"
    with pytest.raises(ValueError, match="only a COLLECTIVE entry has a sharded form"):
        reg.register("rng", dict, print, scope=Scope.PER_RANK, sharded=ShardedForm(dict, print))


def test_the_torch_dist_format_saves_each_entry_in_its_scope(tmp_path):
    """Sharded entries go to DCP shards, global ones to trainer.pt, per-rank ones to the rank's own file;
    --finetune's sub-registry (``only``) holds just the model."""
    m, opt, sched = _one()
    reg = register_core(StateRegistry(), m, opt, sched)
    counter = ValueBox({"seen": 3})
    reg.register("counter", counter.state_dict, counter.load_state_dict, key=("extra", "counter"))
    assert [e.name for e in reg if e.sharded is not None] == ["model", "optimizer"]
    assert [e.name for e in reg.only("model")] == ["model"]
    Checkpointer(CheckpointConfig(save=str(tmp_path)), reg, run_record={}, train_iters=4).save(2)
    d = tmp_path / "iter_0000002"
    trainer = torch.load(d / "trainer.pt", weights_only=False)
    assert trainer["extra"]["counter"] == {"seen": 3} and "rng" not in trainer and "optimizer" not in trainer
    assert set(torch.load(d / "rank_00000.pt", weights_only=False)["rng"]) >= {"python", "numpy", "torch"}
    from megatron.flexsp.training.checkpoint_dist import saved_entries

    assert saved_entries(d / "dist") == {"model", "optimizer"}


@pytest.fixture
def tracker(monkeypatch):
    """Megatron's RNG tracker holding a model-parallel state, on CPU (flexsp_patches' CPU tracker)."""
    from megatron.core.tensor_parallel import random as mrandom

    from flexsp_patches.cpu_compat import CPURNGStatesTracker

    tr = CPURNGStatesTracker()
    tr.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, 1234)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", tr)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    return mrandom


def _dropout_mask(mrandom) -> torch.Tensor:
    with mrandom.get_cuda_rng_tracker().fork():  # where megatron draws its dropout masks
        return torch.rand(8) < 0.5


def test_rng_tracker_round_trips_through_a_checkpoint(tmp_path, tracker):
    """Issue 17 item 4: after a resume, masks drawn in the tracker's fork are the uninterrupted run's."""
    _dropout_mask(tracker)
    m, opt, sched = _one()
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    straight = [_dropout_mask(tracker) for _ in range(3)]
    m2, opt2, sched2 = _one(5)  # the crashed run's tracker has moved on: the checkpoint must rewind it
    ckpt.load_checkpoint(tmp_path, m2, opt2, sched2)
    resumed = [_dropout_mask(tracker) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    saved = torch.load(tmp_path / "iter_0000001" / "trainer.pt", weights_only=False)["rng"][0]
    assert set(saved["tracker"]) == {tracker._MODEL_PARALLEL_RNG_TRACKER_NAME}


def test_an_empty_or_missing_tracker_is_not_saved(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    assert "tracker" not in rng_state()
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", mrandom.CudaRNGStatesTracker())
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    assert "tracker" not in rng_state()  # made but never seeded (CPU without the patch)
    ckpt.set_rng_state(rng_state())  # restoring without tracker states leaves the tracker alone


def test_after_save_runs_at_every_checkpoint(tmp_path):
    """--flexsp-save-calibrated's file is written at every save (interval, exit, final), not only at the end."""
    m, opt, sched = _one()
    written: list[int] = []
    cfg = CheckpointConfig(save=str(tmp_path), save_interval=2, exit_interval=5)
    reg = register_core(StateRegistry(), m, opt, sched)
    saver = Checkpointer(cfg, reg, run_record={}, train_iters=8, after_save=[written.append])
    stops = [saver.maybe_save(it).stop for it in range(1, 6)]
    assert written == [2, 4, 5] and stops == [False] * 4 + [True]
    saver.finish(5)  # already saved at 5: not again
    assert written == [2, 4, 5]


def _relay_body(rank, world_size):
    out = []
    for fails in (False, True):
        try:
            relay_error(ckpt.ResumeMismatchError("rank 0 says no") if fails and rank == 0 else None, ERRORS)
            out.append("ok")
        except ckpt.CheckpointError as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def test_relay_error_raises_rank0s_error_on_every_rank():
    out = run_distributed(_relay_body, 2, timeout=120)
    assert out == [["ok", "ResumeMismatchError: rank 0 says no"]] * 2
