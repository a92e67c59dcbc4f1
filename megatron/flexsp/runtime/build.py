"""One builder for what a rank runs plans on: model, sharding, SP group pool, executor.

Why one: the trainer and the profiler must run the same runtime (the profiler's measurements
are only valid for the model, sharding and groups the trainer will use), and the groups a plan
may use are placed on ranks in one place (``GroupPool.from_cost_model``, the planner's
``placement.candidate_groups``), so a profile and a training run draw from the same pool.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .executor import FlexSPExecutor
from .group_pool import GroupPool
from .model import GPTConfig, build_gpt_model
from .recompute import RecomputeConfig
from .sharding import shard_model

if TYPE_CHECKING:  # the planner is torch-free; only its types are needed here
    from megatron.flexsp.planner.costmodel import CostModel

__all__ = ["Runtime", "build_runtime"]


@dataclass
class Runtime:
    """This rank's model (sharded), the pool of every SP group a plan may use, and the executor."""

    model: nn.Module
    pool: GroupPool
    executor: FlexSPExecutor


def build_runtime(
    model_cfg: GPTConfig,
    cost: CostModel,
    *,
    device: torch.device,
    sharding: str = "fsdp2",
    timeout: datetime.timedelta | None = None,
    recompute: RecomputeConfig | None = None,
) -> Runtime:
    """Build the model on ``device``, shard it, create the cost model's group pool, wrap an executor.

    At ``model_cfg.tensor_model_parallel_size`` t > 1, megatron's parallel_state must hold TP t
    (``cpu_compat.init_model_parallel(tensor_model_parallel_size=t)``); ``cost`` may be the per-GPU
    or the unit cost model. Every rank calls it; the pool is lazy, so no process group is made here (each is made by its
    members when a micro-batch first uses it, see ``group_pool``).
    ``timeout``: the pool's process-group timeout (None: torch.distributed's default).
    ``recompute``: the run's activation recomputation (--recompute-*; default none), validated
    against the model here so a bad setting fails before the model is built.
    """
    if recompute is not None:
        recompute.validate(model_cfg.num_layers, sharding)
    model = build_gpt_model(model_cfg, device=device)
    shard_model(model, sharding)
    # At TP t the plans' groups are unit groups (planner over N/t units): the pool pairs the same TP ranks.
    pool = GroupPool.from_cost_model(cost, timeout=timeout, tensor_parallel_size=model_cfg.tensor_model_parallel_size)
    return Runtime(
        model=model, pool=pool, executor=FlexSPExecutor(model, pool, sharding_mode=sharding, recompute=recompute)
    )
