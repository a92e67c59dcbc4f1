"""AdamW on the (FSDP2-sharded) parameters, Megatron's LR schedule, global gradient-norm clipping.

FSDP2 parameters are DTensor shards; torch.optim.AdamW steps them shard by shard. The gradient
norm must be the norm of the *whole* gradient: the norm over DTensor shards is a partial DTensor
that ``full_tensor()`` reduces over the mesh (one all-reduce), replicated tensors (ddp mode) are
already whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .configs import OptimizerConfig

__all__ = ["LRScheduler", "build_optimizer", "clip_grad_norm", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Megatron's rule: no weight decay on biases and 1-D parameters (norm weights)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclass
class LRScheduler:
    """Linear warmup from 0 to ``lr``, then constant / linear / cosine decay to ``min_lr``.

    Same formulas as Megatron's OptimizerParamScheduler: at step s (0-based iteration whose
    update is being made, counted from 1 for the warmup) lr = lr * s / warmup while s <= warmup;
    then ratio = (s - warmup) / (decay_iters - warmup) clipped to 1, and
    linear: min + (max - min) * (1 - ratio); cosine: min + (max - min) * 0.5 * (cos(pi * ratio) + 1).
    """

    optimizer: torch.optim.Optimizer
    cfg: OptimizerConfig
    num_steps: int = 0

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.lr_warmup_iters > 0 and step <= c.lr_warmup_iters:
            return c.lr * step / c.lr_warmup_iters
        if c.lr_decay_style == "constant":
            return c.lr
        span = max(1, c.lr_decay_iters - c.lr_warmup_iters)
        ratio = min(1.0, max(0.0, (step - c.lr_warmup_iters) / span))
        if c.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif c.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:
            raise ValueError(f"unknown --lr-decay-style {c.lr_decay_style!r} (constant, linear, cosine)")
        return c.min_lr + (c.lr - c.min_lr) * coeff

    def set_for_next_step(self) -> float:
        """Set the learning rate of the update about to be made (step num_steps + 1)."""
        lr = self.lr_at(self.num_steps + 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "cfg": dict(vars(self.cfg))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """AdamW over the model's parameters (DTensor shards under FSDP2) and its scheduler."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # foreach=False: the per-tensor path works for every mix of DTensor shards and plain tensors
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=False)
    sched = LRScheduler(opt, cfg)
    sched.set_for_next_step()
    return opt, sched


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of all gradients (over all ranks' shards); scale them to ``max_norm`` when above.

    ``max_norm <= 0`` only measures. Returns the norm before clipping (same value on every rank).
    """
    params = list(params)
    grads = _grads(params)
    if not grads:
        return 0.0
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        DTensor = ()  # type: ignore[assignment]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.zeros((), dtype=torch.float32)
    if sharded:
        n = torch.nn.utils.get_total_norm(sharded, norm_type=2.0, error_if_nonfinite=False, foreach=False)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        sq = sq + n.detach().float().cpu() ** 2
    if whole:
        n = torch.nn.utils.get_total_norm(whole, norm_type=2.0, error_if_nonfinite=False, foreach=False)
        sq = sq + n.detach().float().cpu() ** 2
    total = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if float(coef) < 1.0:
            for g in grads:
                g.mul_(coef.to(g.device).item())
    return float(total)
