"""The training data of a run: datasets built once (rank 0 first), their batch order, token tensors.

Why apart from the Trainer: building the datasets has its own failure rule (rank 0 may build the
embedded corpus cache; its error must reach every rank before anyone waits on a collective), and
the Trainer only needs the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron.flexsp.data.build import build_datasets
from megatron.flexsp.data.sampler import GlobalBatchSampler

from .arguments import ArgumentError
from .configs import TrainerConfigs
from .error_relay import relay_error

__all__ = ["TrainData", "build_train_data"]

log = logging.getLogger("flexsp.train")


@dataclass
class TrainData:
    """The datasets and their batch order (same on every rank)."""

    train: Any
    valid: Any
    sampler: GlobalBatchSampler
    valid_sampler: GlobalBatchSampler | None

    def sequences(self, dataset: Any, indices: Sequence[int]) -> list[torch.Tensor]:
        return [torch.from_numpy(dataset[int(i)].astype("int64", copy=False)) for i in indices]


def build_train_data(cfg: TrainerConfigs, rank: int) -> TrainData:
    """Datasets on every rank, rank 0 first (it may build and cache the embedded corpus); errors reach every rank."""
    gbs = cfg.train.global_batch_size

    def build():
        try:
            tr, va = build_datasets(cfg.data)
            return tr, va, GlobalBatchSampler(tr.lengths, gbs, cfg.train.seed), None
        except (ValueError, OSError) as e:
            return None, None, None, f"data: {e}"

    built = build() if rank == 0 else None
    relay_error(ArgumentError(built[3]) if rank == 0 and built[3] else None, (ArgumentError,))
    train_ds, valid_ds, sampler, err = built if rank == 0 else build()
    if err:
        raise ArgumentError(err)
    stats = getattr(train_ds, "stats", None)
    log.info(
        "train documents: %d%s",
        len(train_ds),
        f" ({stats.to_dict() if hasattr(stats, 'to_dict') else stats})" if stats is not None else "",
    )
    valid_sampler = None
    interval = cfg.train.eval_interval
    if valid_ds is not None and len(valid_ds) >= gbs and interval:
        valid_sampler = GlobalBatchSampler(valid_ds.lengths, gbs, cfg.train.seed, shuffle=False)
    elif interval:
        log.warning(
            "--eval-interval %d: the validation split has %d documents, fewer than one global batch of %d; "
            "no validation (raise the valid share of --split)",
            interval,
            0 if valid_ds is None else len(valid_ds),
            gbs,
        )
    return TrainData(train_ds, valid_ds, sampler, valid_sampler)
