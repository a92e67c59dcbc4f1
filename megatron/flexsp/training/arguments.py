"""Command line of pretrain_gpt_flexsp.py: parsing, derived defaults, and validation.

The flags themselves (names, types, defaults, help) are in ``flags``. Everything a user can get wrong is checked in ``validate_args`` before any process group,
dataset or model exists, with a message naming the offending flag. ``configs.configs_from_args``
then turns the validated namespace into the dataclass configs the trainer consumes; nothing past
that point reads the namespace.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Sequence

from megatron.flexsp.data.blend import parse_data_path as parse_blend
from megatron.flexsp.data.tokenizer import BYTE_VOCAB_SIZE, TOKENIZER_TYPES, build_tokenizer
from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.runtime.attention import backend_importable
from megatron.flexsp.runtime.recompute import RecomputeConfig, RecomputeError

from .config_types import AUTO_TIME_LIMIT_CAP_S, AUTO_TIME_LIMIT_FRACTION, AUTO_TIME_LIMIT_MIN_S
from .flags import ATTN_ALIASES, SP_MODES, build_parser, preset_flag_defaults

__all__ = [
    "ArgumentError",
    "AUTO_TIME_LIMIT_FRACTION",
    "AUTO_TIME_LIMIT_MIN_S",
    "AUTO_TIME_LIMIT_CAP_S",
    "SP_MODES",
    "build_parser",
    "parse_args",
    "validate_args",
    "validate_against_cost",
    "check_tensor_parallel_vocab",
    "resolve_vocab_size",
    "padded_vocab_size",
    "parse_data_path",
]


class ArgumentError(ValueError):
    """A flag value (or combination) that cannot work; raised before any work starts."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (unknown flags stop argparse with its usage message) and fill derived defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_preset is not None:  # the preset's values become defaults: explicit flags still win
        parser.set_defaults(**preset_flag_defaults(args.model_preset))
        args = parser.parse_args(argv)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.mock_data_median is None:
        args.mock_data_median = max(args.mock_data_min_len, args.seq_length // 16)
    args.attention_backend = ATTN_ALIASES[args.attention_backend]
    if args.exit_signal_handler is None:  # SLURM preempts with a signal: catch it by default there
        args.exit_signal_handler = "SLURM_JOB_ID" in os.environ
    return args


def parse_data_path(items: Sequence[str] | None) -> list[tuple[float, str]]:
    """Megatron's ``--data-path [W1] P1 [W2] P2 ...`` as (weight, prefix) pairs (unweighted: equal weights).

    The data layer owns the format (megatron.flexsp.data.blend.parse_data_path); this only turns its
    complaint into an ArgumentError so the trainer stops before any work.
    """
    if not items:
        return []
    try:
        weights, prefixes = parse_blend(items)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    return list(zip(weights or [1.0] * len(prefixes), prefixes))


def _parse_split(split: str) -> tuple[float, float, float]:
    parts = [s.strip() for s in split.replace("/", ",").split(",") if s.strip()]
    try:
        vals = [float(s) for s in parts]
    except ValueError:
        raise ArgumentError(f"--split {split!r}: expected comma-separated numbers such as 969,30,1") from None
    if not 1 <= len(vals) <= 3 or any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0:
        raise ArgumentError(f"--split {split!r}: expected 1 to 3 non-negative weights with a positive sum")
    vals += [0.0] * (3 - len(vals))
    if vals[0] <= 0:
        raise ArgumentError(f"--split {split!r}: the training share must be positive")
    return vals[0], vals[1], vals[2]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_vocab_size(args: argparse.Namespace) -> int:
    """--vocab-size, else the tokenizer's; the byte-level tokenizer for the built-in corpus and mock data."""
    tok_vocab = None
    if args.tokenizer_type:
        tok_vocab = int(build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size)
    elif not args.data_path:
        tok_vocab = BYTE_VOCAB_SIZE
    if args.vocab_size is None:
        if tok_vocab is None:
            raise ArgumentError(
                "--data-path without --tokenizer-type: give --vocab-size (or the tokenizer the "
                "data was preprocessed with)"
            )
        return tok_vocab
    if tok_vocab is not None and args.vocab_size < tok_vocab:
        raise ArgumentError(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's vocabulary {tok_vocab}")
    return int(args.vocab_size)


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron's padding of the embedding table (tensor parallel 1): the next multiple of ``divisible_by``.

    Why: Megatron checkpoints and converted Hugging Face models have tables of that size, and GPU matmuls
    prefer it. As in Megatron the extra rows only pad the table: no token id reaches them (the data keeps
    the tokenizer's vocabulary), so they are never an input or a target.
    """
    return -(-int(vocab_size) // int(divisible_by)) * int(divisible_by)


def _err(msg: str) -> None:
    raise ArgumentError(msg)


def _validate_model(args: argparse.Namespace) -> None:
    """Model shape: heads, query groups, positions, dropout, no PP."""
    heads, groups = args.num_attention_heads, args.num_query_groups
    if args.hidden_size % heads:
        _err(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}")
    if heads % groups:
        _err(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
    if groups != heads and not args.group_query_attention:
        _err(f"--num-query-groups {groups} differs from --num-attention-heads {heads}: add --group-query-attention")
    if args.seq_length > args.max_position_embeddings:
        _err(f"--seq-length {args.seq_length} is above --max-position-embeddings {args.max_position_embeddings}")
    if args.use_rope_scaling and args.position_embedding_type != "rope":
        _err(f"--use-rope-scaling needs --position-embedding-type rope, got {args.position_embedding_type}")
    for name in ("hidden_dropout", "attention_dropout"):
        if getattr(args, name) >= 1.0:
            _err(f"--{name.replace('_', '-')} must be below 1, got {getattr(args, name)}")
    if args.pipeline_model_parallel_size != 1:
        _err(
            "--pipeline-model-parallel-size must be 1: pipeline parallelism is not supported yet (tensor "
            "parallelism, FlexSP's sequence parallelism and FSDP2 compose)"
        )


def _validate_tensor_parallel(args: argparse.Namespace, world_size: int, has_cuda: bool) -> None:
    """--tensor-model-parallel-size t: world/t units of t consecutive ranks, heads and kv groups split over t;
    --sequence-parallel only where reduce-scatter exists. (The node size is checked with the cost model.)"""
    t, sp = args.tensor_model_parallel_size, bool(getattr(args, "sequence_parallel", False))
    if t == 1:
        if sp:
            _err("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits activations over a TP group)")
        return
    if world_size % t:
        _err(f"--tensor-model-parallel-size {t} does not divide the world size {world_size}")
    if args.num_attention_heads % t:
        _err(f"--tensor-model-parallel-size {t} does not divide --num-attention-heads {args.num_attention_heads}")
    if args.num_query_groups % t:
        _err(f"--tensor-model-parallel-size {t} does not divide --num-query-groups {args.num_query_groups}")
    backend = args.distributed_backend or ("nccl" if has_cuda else "gloo")
    if sp and backend != "nccl":
        _err(f"--sequence-parallel needs NCCL reduce-scatter, which the {backend} backend lacks (drop it on gloo)")
    if args.save and getattr(args, "ckpt_format", "torch_dist") == "torch":
        _err(
            f"--ckpt-format torch cannot save a run at --tensor-model-parallel-size {t} (it holds whole tensors on "
            "rank 0): use --ckpt-format torch_dist, the default, which stores whole tensors and loads at any TP size"
        )


def check_tensor_parallel_vocab(padded_vocab: int, tp: int) -> None:
    """The vocab-parallel embedding splits the padded table over the TP group: t must divide it. (The padding
    stays TP-independent, --make-vocab-size-divisible-by alone, so a checkpoint keeps its table at any t.)"""
    if padded_vocab % tp:
        _err(
            f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary {padded_vocab}: raise "
            "--make-vocab-size-divisible-by to a multiple of it"
        )


def _validate_training(args: argparse.Namespace) -> None:
    """Optimizer and schedule."""
    if args.min_lr > args.lr:
        _err(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.lr_decay_style != "constant" and args.lr_warmup_iters > args.lr_decay_iters:
        _err(f"--lr-warmup-iters {args.lr_warmup_iters} is above --lr-decay-iters {args.lr_decay_iters}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(args, name)
        if not 0.0 <= v < 1.0:
            _err(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    if args.adam_eps <= 0:
        _err(f"--adam-eps must be > 0, got {args.adam_eps}")
    if args.global_batch_size < 1:
        _err("--global-batch-size must be >= 1")


def _validate_devices(args: argparse.Namespace, has_cuda: bool) -> None:
    """Devices, kernels and optional packages."""
    if args.bf16 and not has_cuda:
        _err("--bf16 needs a GPU: this machine has no CUDA device (the CPU runs train in fp32)")
    if args.distributed_backend == "nccl" and not has_cuda:
        _err("--distributed-backend nccl needs CUDA GPUs; use gloo on CPU")
    if args.attention_backend in ("flash", "te"):
        if not has_cuda:
            _err(f"--attention-backend {args.attention_backend} needs a GPU (nccl); use sdpa on CPU")
        if not args.bf16:
            _err(
                f"--attention-backend {args.attention_backend} needs --bf16: flash-attn rejects fp32 and Transformer "
                "Engine has no fp32 kernel for packed documents (use sdpa for fp32)"
            )
    if args.attention_backend == "flash" and not backend_importable("flash"):
        _err("--attention-backend flash: flash_attn does not import here (pip install flash-attn, see docs/gpu.md)")
    if args.attention_backend == "te" and not backend_importable("te"):
        _err("--attention-backend te: transformer_engine.pytorch does not import here (see docs/gpu.md)")
    if args.transformer_impl == "transformer_engine":
        if not has_cuda:
            _err("--transformer-impl transformer_engine needs a GPU; use local on CPU")
        if not backend_importable("te"):
            _err("--transformer-impl transformer_engine: transformer_engine.pytorch does not import here")
    if args.tensorboard_dir and not (_installed("tensorboard") or _installed("tensorboardX")):
        _err(
            "--tensorboard-dir: the tensorboard package is not installed (pip install tensorboard, or "
            "pip install -e .[tensorboard])"
        )
    if args.wandb_project and not _installed("wandb"):
        _err("--wandb-project: the wandb package is not installed (pip install wandb)")


def _validate_data(args: argparse.Namespace) -> None:
    """Data sources, split and tokenizer."""
    if args.mock_data and args.data_path:
        _err("--mock-data and --data-path are exclusive: choose one data source")
    parse_data_path(args.data_path)
    _parse_split(args.split)
    if args.tokenizer_type is not None:
        if args.tokenizer_type not in TOKENIZER_TYPES:
            _err(
                f"--tokenizer-type {args.tokenizer_type!r} is not supported (choose from {', '.join(TOKENIZER_TYPES)})"
            )
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        _err("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH")
    if args.mock_data and args.mock_data_min_len > args.seq_length:
        _err(f"--mock-data-min-len {args.mock_data_min_len} is above --seq-length {args.seq_length}")


def _validate_run(args: argparse.Namespace) -> None:
    """Checkpoints, evaluation and the planner's flags."""
    if args.save_interval and not args.save:
        _err("--save-interval needs --save DIR")
    if getattr(args, "finetune", False) and not args.load:
        _err("--finetune needs --load CKPT (the checkpoint whose weights to start from)")
    if getattr(args, "async_save", False) and getattr(args, "ckpt_format", "torch_dist") != "torch_dist":
        _err("--async-save needs --ckpt-format torch_dist (the torch format gathers everything on rank 0)")
    if args.eval_interval and args.split and _parse_split(args.split)[1] <= 0:
        _err(f"--eval-interval {args.eval_interval} needs a validation share in --split (got {args.split!r})")
    if args.flexsp_gap >= 1:
        _err(f"--flexsp-gap must be below 1 (a fraction of the lower bound), got {args.flexsp_gap}")
    if args.flexsp_compare_with is not None and args.flexsp_compare_with == args.sp_mode:
        _err(f"--flexsp-compare-with {args.flexsp_compare_with} is the --sp-mode itself; pick another mode")


def _validate_recompute(args: argparse.Namespace) -> None:
    """--recompute-*: Megatron's combinations, the model's layer count, the modules FlexSP supports."""
    modules = getattr(args, "recompute_modules", None)
    cfg = RecomputeConfig(
        granularity=getattr(args, "recompute_granularity", None) or "none",
        method=getattr(args, "recompute_method", None),
        num_layers=getattr(args, "recompute_num_layers", None),
        modules=None if modules is None else tuple(modules),
    )
    try:
        cfg.validate(args.num_layers, getattr(args, "flexsp_sharding", "fsdp2"))
    except RecomputeError as e:
        _err(str(e))


def validate_args(args: argparse.Namespace, world_size: int, *, has_cuda: bool) -> None:
    """Stop with a clear message on any conflicting or impossible setting (before any work).

    Pure: no process group needed. ``validate_against_cost`` then checks what depends on the
    starting cost model (``cost_setup.resolve_cost_model``, which needs a valid model shape).
    """
    if world_size <= 0:
        _err(f"world size must be positive, got {world_size}")
    _validate_model(args)
    _validate_tensor_parallel(args, world_size, has_cuda)
    _validate_training(args)
    _validate_devices(args, has_cuda)
    _validate_data(args)
    _validate_run(args)
    _validate_recompute(args)


def validate_against_cost(args: argparse.Namespace, world_size: int, cost: CostModel) -> None:
    """The settings that depend on the starting cost model: SP degrees, capacity, the static degree."""
    heads = args.num_attention_heads
    try:
        cost.check_world_size(world_size)
    except CostModelError as e:
        _err(f"{e}: launch a multiple of gpus_per_node ranks (or use a cost model for this cluster)")
    allowed = cost.allowed_degrees(world_size)
    bad = [d for d in allowed if heads % d]
    if bad:
        _err(
            f"--num-attention-heads {heads} is not divisible by SP degree(s) {bad} that cost model "
            f"'{cost.name}' allows on {world_size} ranks (degrees {allowed})"
        )
    holding = [d for d in allowed if cost.fits(args.seq_length, d)]
    if not holding:
        biggest = max(allowed)
        t = args.tensor_model_parallel_size  # at TP t the degrees count units of t ranks
        size = f"{biggest} ranks" if t == 1 else f"{biggest} units of {t} ranks"
        _err(
            f"--seq-length {args.seq_length} does not fit any SP group: the largest ({size}) holds "
            f"{cost.capacity(biggest)} tokens under cost model '{cost.name}'; lower --seq-length or add ranks"
            + ("" if t == 1 or getattr(args, "sequence_parallel", False) else " (or --sequence-parallel on NCCL)")
        )
    cp = args.context_parallel_size
    if cp is not None:
        if args.sp_mode != "static" and args.flexsp_compare_with != "static" and cp != 1:
            _err(
                f"--context-parallel-size {cp} applies to --sp-mode static only (--sp-mode {args.sp_mode} "
                "chooses its degrees per micro-batch)"
            )
        if "static" in (args.sp_mode, args.flexsp_compare_with):
            if heads % cp:
                _err(f"--num-attention-heads {heads} is not divisible by --context-parallel-size {cp}")
            if world_size % cp:
                _err(f"world size {world_size} is not divisible by --context-parallel-size {cp}")
            if cp not in allowed:
                _err(
                    f"--context-parallel-size {cp} is not a degree cost model '{cost.name}' allows on "
                    f"{world_size} ranks (allowed: {allowed})"
                )
            if not cost.fits(args.seq_length, cp):
                _err(
                    f"--context-parallel-size {cp} cannot hold --seq-length {args.seq_length}: a group of {cp} "
                    f"ranks holds {cost.capacity(cp)} tokens; use at least {holding[0]}"
                )
