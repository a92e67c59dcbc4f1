"""The model, optimizer, scheduler and RNG as registry entries, in the checkpoint's files.

Why here: every run that checkpoints (the Trainer, tests, tools) has these four; registering them
in one place keeps their files (model.pt, optim.pt) and scopes the same for all.
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint_format import MODEL_FILE, OPTIM_FILE, state_dict_options
from .rng_state import rng_state, set_rng_state
from .state_registry import Scope, ShardedForm, StateRegistry

__all__ = ["register_core"]


def register_core(
    registry: StateRegistry,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
) -> StateRegistry:
    """Register model (model.pt), optimizer (optim.pt), scheduler and per-rank RNG, in load order."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    shard = StateDictOptions(full_state_dict=False)  # this rank's DTensor shards, for the torch_dist format
    registry.register(
        "model",
        lambda: get_model_state_dict(model, options=state_dict_options()),
        lambda sd: set_model_state_dict(model, sd or {}, options=state_dict_options(load=True)),
        scope=Scope.COLLECTIVE,
        file=MODEL_FILE,
        sharded=ShardedForm(
            lambda: get_model_state_dict(model, options=shard),
            lambda sd: set_model_state_dict(model, sd, options=shard),
        ),
    )
    if optimizer is not None:
        registry.register(
            "optimizer",
            lambda: get_optimizer_state_dict(model, optimizer, options=state_dict_options()),
            lambda sd: set_optimizer_state_dict(model, optimizer, sd or {}, options=state_dict_options(load=True)),
            scope=Scope.COLLECTIVE,
            file=OPTIM_FILE,
            sharded=ShardedForm(
                lambda: get_optimizer_state_dict(model, optimizer, options=shard),
                lambda sd: set_optimizer_state_dict(model, optimizer, sd, options=shard),
            ),
        )
    if scheduler is not None:
        registry.register("scheduler", scheduler.state_dict, scheduler.load_state_dict)
    registry.register("rng", rng_state, set_rng_state, scope=Scope.PER_RANK)
    return registry
