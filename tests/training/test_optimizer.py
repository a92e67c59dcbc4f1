"""Optimizer: Megatron's LR schedule formulas, global-norm clipping and AdamW on FSDP2 shards (gloo)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.flexsp.training.configs import OptimizerConfig
from megatron.flexsp.training.optimizer import LRScheduler, build_optimizer, clip_grad_norm, param_groups
from tests.dist_utils import run_distributed


def _cfg(**kw) -> OptimizerConfig:
    """The defaults but for a schedule easy to check by hand (and beta2 0.95)."""
    base = dict(lr=1.0, min_lr=0.1, adam_beta2=0.95, lr_warmup_iters=4, lr_decay_iters=14)
    return OptimizerConfig(**{**base, **kw})


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_lr_schedule_matches_megatron_formulas(style):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    s = LRScheduler(opt, _cfg(lr_decay_style=style))
    seen = []
    for _ in range(20):
        seen.append(s.set_for_next_step())
        s.step()
    # warmup: steps 1..4 -> 0.25, 0.5, 0.75, 1.0
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(5, 21):
        got = seen[step - 1]
        frac = min(1.0, (step - 4) / 10)
        want = {
            "constant": 1.0,
            "linear": 0.1 + 0.9 * (1 - frac),
            "cosine": 0.1 + 0.9 * (1 + math.cos(math.pi * frac)) / 2,
        }[style]
        assert got == pytest.approx(want), (style, step)
    assert opt.param_groups[0]["lr"] == pytest.approx(seen[-1])
    # decay ends exactly at min_lr and stays there (constant stays at lr)
    assert seen[-1] == pytest.approx(1.0 if style == "constant" else 0.1)


def test_scheduler_state_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    a = LRScheduler(opt, _cfg())
    for _ in range(7):
        a.step()
    b = LRScheduler(opt, _cfg())
    b.load_state_dict(a.state_dict())
    assert b.set_for_next_step() == a.lr_at(8)


def test_no_weight_decay_on_bias_and_norm():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(m, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m[0].weight)}


def test_clip_plain_tensors_against_manual_norm():
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    ps[0].grad = torch.tensor([3.0, 0.0, 0.0])
    ps[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert clip_grad_norm(ps, 10.0) == pytest.approx(5.0)
    assert ps[0].grad[0].item() == pytest.approx(3.0)  # under the limit: unchanged
    assert clip_grad_norm(ps, 1.0) == pytest.approx(5.0)
    assert ps[0].grad[0].item() == pytest.approx(0.6, rel=1e-5)
    assert ps[1].grad[0, 1].item() == pytest.approx(0.8, rel=1e-5)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 3))


_SHORT = dict(lr=0.05, min_lr=0.0, lr_warmup_iters=1, lr_decay_iters=5)  # the schedule of the clipping runs


def _batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration ``it``'s 8 samples (the same in every process)."""
    g = torch.Generator().manual_seed(100 + it)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _train(m: torch.nn.Module, steps: int, clip: float, rows: slice = slice(None)) -> list[float]:
    """``steps`` clipped AdamW steps on these ``rows`` of each batch (the loss is over all 8 samples,
    so the ranks' gradients sum to the single process's); the gradient norms."""
    opt, sched = build_optimizer(m, _cfg(clip_grad=clip, **_SHORT))
    norms = []
    for it in range(steps):
        x, y = _batch(it)
        loss = ((m(x[rows]) - y[rows]) ** 2).sum() / 8
        loss.backward()
        norms.append(clip_grad_norm(m.parameters(), clip))
        opt.step()
        opt.zero_grad()
        sched.step()
        sched.set_for_next_step()
    return norms


def _reference(steps: int, clip: float):
    """Single process: the same data, grads of the mean loss over all ranks' samples."""
    m = _model(0)
    norms = _train(m, steps, clip)
    return norms, {k: v.detach().clone() for k, v in m.state_dict().items()}


def _fsdp_body(rank: int, world_size: int, steps: int, clip: float):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = _model(0)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    for mod in (m, m[0], m[2]):  # grads summed over ranks, as the runtime's sharding does
        mod.set_gradient_divide_factor(1.0)
        mod.set_force_sum_reduction_for_comms(True)
    per = 8 // world_size
    norms = _train(m, steps, clip, rows=slice(rank * per, (rank + 1) * per))
    full = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in m.state_dict().items()
    }
    return norms, full


def test_fsdp2_adamw_and_clipping_match_single_process():
    ref_norms, ref_state = _reference(3, clip=0.5)
    assert ref_norms[0] > 0.5  # the clip is active, so clipping is really tested
    out = run_distributed(_fsdp_body, 2, 3, 0.5, timeout=120)
    for norms, state in out:
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
