"""The trainer's configuration: one dataclass per concern, filled from the validated flags.

Why: the parsed namespace holds ~90 flags of every concern; each component (model builder,
optimizer, planner, checkpointer, logger, data) should see only its own settings, typed, so a
reader knows what a component depends on and a test can build one without argparse. Fields are
filled by a ``fields()`` loop from the flags of the same name (Megatron's
``core_transformer_config_from_args`` pattern), so adding a flag to a config is one line. The
dataclasses and their defaults live in ``config_types`` (the parser reads its defaults there);
they are re-exported here.

Resolution that needs the machine (vocabulary from the tokenizer, the attention backend for the
device, the cost model) happens once here, in ``configs_from_args``, after ``validate_args``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

import torch

from megatron.flexsp.data.build import DataConfig
from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.runtime.attention import resolve_backend
from megatron.flexsp.runtime.model import GPTConfig

from . import arguments as A
from .config_types import (
    CheckpointConfig,
    DistributedConfig,
    FlexSPConfig,
    LoggingConfig,
    OptimizerConfig,
    TrainConfig,
)
from .cost_setup import resolve_cost_model, tensor_parallel_units
from .distributed import LaunchEnv, device_for_backend

# The config dataclasses are importable from here too (their home is config_types).
__all__ = ["TrainerConfigs", "FLAG_NAMES", "fill_from_args", "model_config_from_args", "configs_from_args"]

T = TypeVar("T")

# Config fields whose flag has another name (every other field is filled from the flag of its name).
FLAG_NAMES: dict[type, dict[str, str]] = {
    FlexSPConfig: {
        "time_limit_s": "flexsp_time_limit",
        "plan_ahead": "flexsp_plan_ahead",
        "dump_plans": "flexsp_dump_plans",
        "sharding": "flexsp_sharding",
        "compare_with": "flexsp_compare_with",
        "gap": "flexsp_gap",
        "save_calibrated": "flexsp_save_calibrated",
    },
    DistributedConfig: {"backend": "distributed_backend", "timeout_minutes": "distributed_timeout_minutes"},
}


def fill_from_args(cls: type[T], args: argparse.Namespace, renames: dict[str, str] | None = None, **given: Any) -> T:
    """``cls(**fields)``: each field from ``given``, else the flag ``renames.get(name, name)``, else its default."""
    renames = renames or {}
    kw: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name in given:
            kw[f.name] = given[f.name]
        elif hasattr(args, renames.get(f.name, f.name)):
            kw[f.name] = getattr(args, renames.get(f.name, f.name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag --{f.name.replace('_', '-')} and no value given")
    return cls(**kw)


@dataclass
class TrainerConfigs:
    """Everything the Trainer needs; ``run_record`` is the flag record stored in checkpoints and wandb."""

    model: GPTConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    flexsp: FlexSPConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    data: DataConfig
    distributed: DistributedConfig
    cost: CostModel
    cost_note: str = ""  # where the starting cost model came from (logged at start-up)
    run_record: dict[str, Any] = field(default_factory=dict)


def model_config_from_args(args: argparse.Namespace, *, cuda: bool, vocab_size: int | None = None) -> GPTConfig:
    """The runtime's GPTConfig for these flags: vocabulary resolved and padded (--make-vocab-size-divisible-by),
    embeddings tied unless --untie-embeddings-and-output-weights, attention backend chosen for the device."""
    device = torch.device("cuda" if cuda else "cpu")
    try:
        backend = resolve_backend(args.attention_backend, device, bf16=bool(args.bf16))
    except (ValueError, ImportError) as e:
        raise A.ArgumentError(f"--attention-backend {args.attention_backend}: {e}") from None
    vocab = A.padded_vocab_size(vocab_size or A.resolve_vocab_size(args), args.make_vocab_size_divisible_by)
    return fill_from_args(
        GPTConfig,
        args,
        vocab_size=vocab,
        attention_backend=backend,
        params_dtype=torch.float32,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        extra={},
    )


def configs_from_args(args: argparse.Namespace, env: LaunchEnv) -> TrainerConfigs:
    """Validate the flags for this launch and split them into the Trainer's configs (no process group needed)."""
    _, device = device_for_backend(args.distributed_backend)
    cuda = device is None
    A.validate_args(args, env.world_size, has_cuda=cuda)
    vocab = A.resolve_vocab_size(args)  # the tokenizer's: the data's token ids stay below it
    A.check_tensor_parallel_vocab(
        A.padded_vocab_size(vocab, args.make_vocab_size_divisible_by), args.tensor_model_parallel_size
    )
    start = resolve_cost_model(
        args,
        world_size=env.world_size,
        local_ranks=env.local_world_size,
        cuda=cuda,
        vocab_size=A.padded_vocab_size(vocab, args.make_vocab_size_divisible_by),
        local_rank=env.local_rank,
    )
    start = tensor_parallel_units(start, args, world_size=env.world_size, local_ranks=env.local_world_size)
    A.validate_against_cost(args, env.world_size // args.tensor_model_parallel_size, start.cost)  # over units
    model = model_config_from_args(args, cuda=cuda, vocab_size=vocab)
    data = DataConfig.from_args(args, vocab_size=vocab)
    try:
        data.validate()
    except ValueError as e:
        raise A.ArgumentError(f"data: {e}") from None
    return TrainerConfigs(
        model=model,
        optimizer=fill_from_args(OptimizerConfig, args),
        train=fill_from_args(TrainConfig, args),
        flexsp=fill_from_args(
            FlexSPConfig,
            args,
            FLAG_NAMES[FlexSPConfig],
            calibrate=args.flexsp_calibrate == "on",
        ),
        logging=fill_from_args(LoggingConfig, args, progress_bar=not args.no_progress_bar),
        checkpoint=fill_from_args(
            CheckpointConfig,
            args,
            save_final=not args.no_save_final,
            exit_signal=args.exit_signal if args.exit_signal_handler else None,
        ),
        data=data,
        distributed=fill_from_args(
            DistributedConfig,
            args,
            FLAG_NAMES[DistributedConfig],
        ),
        cost=start.cost,
        cost_note=start.note,
        run_record={k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool, list))},
    )
