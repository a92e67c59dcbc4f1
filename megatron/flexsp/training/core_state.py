"""The model, optimizer, scheduler and RNG as registry entries, in the checkpoint's files.

Why here: every run that checkpoints (the Trainer, tests, tools) has these four; registering them
in one place keeps their files (model.pt, optim.pt) and scopes the same for all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..runtime.sharding import tensor_parallel_layout
from .checkpoint_format import MODEL_FILE, OPTIM_FILE, CheckpointError, state_dict_options
from .checkpoint_tp import model_pieces, optimizer_pieces, unwrap_pieces
from .checkpoint_tp_whole import scatter_whole
from .rng_state import rng_state, set_rng_state
from .state_registry import Scope, ShardedForm, StateRegistry

__all__ = ["register_core"]


def register_core(
    registry: StateRegistry,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
) -> StateRegistry:
    """Register model (model.pt), optimizer (optim.pt), scheduler and per-rank RNG, in load order.

    At TP > 1 the sharded form (torch_dist) stores each TP partition as boxes of the whole tensor
    (``checkpoint_tp``), so the checkpoint is the TP 1 model's and loads at any TP size; the one-file
    torch format loads into a TP run (``checkpoint_tp_whole``) but is not written by one."""
    from torch.distributed.checkpoint import state_dict as S

    shard = S.StateDictOptions(full_state_dict=False)  # this rank's DTensor shards, for the torch_dist format
    t, j, layout = tensor_parallel_layout(model)

    def model_shards() -> dict[str, Any]:
        return model_pieces(S.get_model_state_dict(model, options=shard), layout, t, j)

    def load_model_whole(sd: Any) -> None:
        if t == 1:
            S.set_model_state_dict(model, sd or {}, options=state_dict_options(load=True))
        else:
            S.set_model_state_dict(model, unwrap_pieces(scatter_whole(model_shards(), sd, "model")), options=shard)

    registry.register(
        "model",
        _whole_saver(t, lambda: S.get_model_state_dict(model, options=state_dict_options())),
        load_model_whole,
        scope=Scope.COLLECTIVE,
        file=MODEL_FILE,
        sharded=ShardedForm(model_shards, lambda sd: S.set_model_state_dict(model, unwrap_pieces(sd), options=shard)),
    )
    if optimizer is not None:
        _register_optimizer(registry, model, optimizer, (t, j, layout))
    if scheduler is not None:
        registry.register("scheduler", scheduler.state_dict, scheduler.load_state_dict)
    registry.register("rng", rng_state, set_rng_state, scope=Scope.PER_RANK)
    return registry


def _register_optimizer(registry: StateRegistry, model: torch.nn.Module, optimizer: Any, tp: tuple) -> None:
    """The optimizer entry: its per-element states follow the parameters' TP layout (``register_core``)."""
    from torch.distributed.checkpoint import state_dict as S

    shard = S.StateDictOptions(full_state_dict=False)
    t, j, layout = tp

    def shards() -> dict[str, Any]:
        return optimizer_pieces(S.get_optimizer_state_dict(model, optimizer, options=shard), layout, t, j)

    def load_whole(sd: Any) -> None:
        if t == 1:
            S.set_optimizer_state_dict(model, optimizer, sd or {}, options=state_dict_options(load=True))
        else:
            filled = unwrap_pieces(scatter_whole(shards(), sd, "optimizer state"))
            S.set_optimizer_state_dict(model, optimizer, filled, options=shard)

    registry.register(
        "optimizer",
        _whole_saver(t, lambda: S.get_optimizer_state_dict(model, optimizer, options=state_dict_options())),
        load_whole,
        scope=Scope.COLLECTIVE,
        file=OPTIM_FILE,
        sharded=ShardedForm(
            shards, lambda sd: S.set_optimizer_state_dict(model, optimizer, unwrap_pieces(sd), options=shard)
        ),
    )


def _whole_saver(t: int, state_dict: Callable[[], Any]) -> Callable[[], Any]:
    """The one-file format's save: whole tensors gathered on rank 0, which a TP run does not do (a save
    that stored one TP partition as the model would resume wrong); its sharded form is the way."""
    if t == 1:
        return state_dict

    def refuse() -> Any:
        raise CheckpointError(
            f"the torch checkpoint format cannot save a tensor-parallel run (TP {t}): use --ckpt-format "
            "torch_dist (the default), which stores whole tensors and loads at any TP size"
        )

    return refuse
