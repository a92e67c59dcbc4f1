"""Command line of pretrain_gpt_flexsp.py: Megatron's flag names and meanings, FlexSP's own flags.

Everything a user can get wrong is checked in ``validate_args`` before any process group,
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
from megatron.flexsp.planner.api import METHODS as SP_MODES
from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.runtime.attention import backend_importable

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
    "resolve_vocab_size",
    "parse_data_path",
]

# Megatron's --attention-backend names map onto the FlexSP attention backends.
_ATTN_ALIASES = {
    "auto": "auto",
    "sdpa": "sdpa",
    "flash": "flash",
    "te": "te",
    "fused": "te",
    "unfused": "sdpa",
    "local": "sdpa",
}


class ArgumentError(ValueError):
    """A flag value (or combination) that cannot work; raised before any work starts."""


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


# --flexsp-time-limit auto: this share of the measured iteration time, within [min, cap] seconds.
# 5%: on the 4 x 32 benchmark the plan at a 20 ms budget is within 0.2% of the one at 50 ms, and the
# background planner's CPU share of a standalone run fell from ~8% (at 10%) to ~5%.
AUTO_TIME_LIMIT_FRACTION = 0.05
AUTO_TIME_LIMIT_MIN_S = 0.02
AUTO_TIME_LIMIT_CAP_S = 2.0


def _time_limit(s: str) -> float | None:
    """'auto' (None: set from the measured iteration time) or seconds > 0."""
    return None if s == "auto" else _positive_float(s)


def _model_flags(m: argparse._ArgumentGroup) -> None:
    m.add_argument("--num-layers", type=_positive_int, default=2)
    m.add_argument("--hidden-size", type=_positive_int, default=64)
    m.add_argument("--ffn-hidden-size", type=_positive_int, default=None, help="default 4*hidden (or the SwiGLU size)")
    m.add_argument("--num-attention-heads", type=_positive_int, default=4)
    m.add_argument("--group-query-attention", action="store_true")
    m.add_argument("--num-query-groups", type=_positive_int, default=None)
    m.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="rope")
    m.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="RMSNorm")
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--max-position-embeddings", type=_positive_int, default=None, help="default: --seq-length")
    m.add_argument(
        "--seq-length",
        type=_positive_int,
        default=2048,
        help="longest document kept (tokens of model input); longer ones are truncated or dropped (--overlong)",
    )
    m.add_argument("--vocab-size", type=_positive_int, default=None, help="default: the tokenizer's vocabulary")
    m.add_argument(
        "--tokenizer-type",
        default=None,
        help="ByteTokenizer (built in, no download; the default corpus uses it) or HuggingFaceTokenizer "
        "with --tokenizer-model",
    )
    m.add_argument("--tokenizer-model", default=None, help="local path of a HuggingFace tokenizer")
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--rotary-base", type=_positive_int, default=10000)
    m.add_argument(
        "--hidden-dropout",
        type=_nonneg_float,
        default=0.0,
        help="default 0 (Megatron: 0.1): with dropout, sp-modes no longer give bit-comparable losses",
    )
    m.add_argument("--attention-dropout", type=_nonneg_float, default=0.0, help="default 0 (Megatron: 0.1)")


def _training_flags(t: argparse._ArgumentGroup) -> None:
    t.add_argument("--global-batch-size", type=_positive_int, default=32, help="documents per global batch")
    t.add_argument(
        "--micro-batch-size",
        type=_positive_int,
        default=None,
        help="accepted for Megatron compatibility and ignored: the planner chooses micro-batches",
    )
    t.add_argument("--train-iters", type=_positive_int, default=20)
    t.add_argument("--lr", type=_nonneg_float, default=1e-3)
    t.add_argument("--min-lr", type=_nonneg_float, default=0.0)
    t.add_argument("--lr-warmup-iters", type=_nonneg_int, default=0)
    t.add_argument("--lr-decay-iters", type=_positive_int, default=None, help="default: --train-iters")
    t.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    t.add_argument("--weight-decay", type=_nonneg_float, default=0.01)
    t.add_argument("--clip-grad", type=_nonneg_float, default=1.0, help="global gradient-norm clip; 0 disables")
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU only)")
    t.add_argument("--eval-interval", type=_nonneg_int, default=0, help="validate every N iterations; 0 disables")
    t.add_argument("--eval-iters", type=_positive_int, default=2, help="global batches per validation")
    t.add_argument(
        "--exit-interval",
        type=_positive_int,
        default=None,
        help="save (if --save) and exit after the iteration divisible by this value",
    )
    t.add_argument(
        "--max-skipped-steps",
        type=_positive_int,
        default=5,
        help="a step whose loss or gradient norm is not finite is skipped (no update); this many in a "
        "row stop the run with exit code 3",
    )


def _data_flags(d: argparse._ArgumentGroup) -> None:
    d.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="Megatron .bin/.idx prefixes, optionally with weights: [W1] PREFIX1 [W2] PREFIX2 ...; "
        "default (without --mock-data): a corpus built from the Python standard library sources",
    )
    d.add_argument("--split", default="969,30,1", help="train,valid,test weights of the documents")
    d.add_argument("--mock-data", action="store_true", help="random tokens with a long-tail length distribution")
    d.add_argument("--mock-data-num-docs", type=_positive_int, default=20000)
    d.add_argument("--mock-data-median", type=_positive_int, default=None, help="default: seq-length / 16")
    d.add_argument("--mock-data-sigma", type=_nonneg_float, default=1.0)
    d.add_argument("--mock-data-tail-frac", type=_nonneg_float, default=0.05)
    d.add_argument("--mock-data-pareto-alpha", type=_nonneg_float, default=1.2)
    d.add_argument("--mock-data-min-len", type=_positive_int, default=16)
    d.add_argument(
        "--mock-data-max-len",
        type=_positive_int,
        default=None,
        help="longest generated document (default: --seq-length; longer ones exercise --overlong)",
    )
    d.add_argument(
        "--overlong",
        choices=["truncate", "drop"],
        default="truncate",
        help="what happens to documents longer than --seq-length",
    )
    d.add_argument(
        "--stdlib-granularity",
        choices=["toplevel", "file"],
        default="toplevel",
        help="documents of the default corpus: one per top-level def/class block (long-tailed, "
        "median ~500 tokens) or one per stdlib file",
    )


def _checkpoint_flags(c: argparse._ArgumentGroup) -> None:
    c.add_argument("--save", default=None, help="checkpoint directory to write")
    c.add_argument("--load", default=None, help="checkpoint directory to resume from")
    c.add_argument("--save-interval", type=_positive_int, default=None)
    c.add_argument("--no-save-final", action="store_true", help="do not save at the end of training")
    c.add_argument(
        "--keep-latest-k",
        type=_positive_int,
        default=None,
        help="keep only the newest K checkpoints in --save (default: keep all)",
    )
    c.add_argument(
        "--load-step",
        type=_positive_int,
        default=None,
        help="resume from this iteration's checkpoint instead of the newest one",
    )
    c.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, take this run's LR-schedule flags instead of refusing a changed schedule",
    )
    c.add_argument(
        "--exit-signal-handler",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on --exit-signal, save a checkpoint (if --save) at the next iteration boundary and exit 0 "
        "(default: on under SLURM, off otherwise)",
    )
    c.add_argument(
        "--exit-signal",
        default="SIGTERM",
        choices=["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"],
        help="the signal --exit-signal-handler catches (SLURM scripts send SIGUSR1 90 s before the limit)",
    )
    c.add_argument(
        "--exit-duration-in-mins",
        type=_positive_float,
        default=None,
        help="save (if --save) and exit 0 at the first iteration boundary after this many minutes",
    )


def _logging_flags(lg: argparse._ArgumentGroup) -> None:
    lg.add_argument("--log-interval", type=_positive_int, default=1)
    lg.add_argument("--tensorboard-dir", default=None)
    lg.add_argument("--wandb-project", default=None)
    lg.add_argument("--wandb-exp-name", default=None)
    lg.add_argument("--metrics-file", default=None, help="append one JSON object per logged iteration")
    lg.add_argument("--no-progress-bar", action="store_true")


def _parallelism_flags(par: argparse._ArgumentGroup) -> None:
    par.add_argument(
        "--distributed-backend", choices=["nccl", "gloo"], default=None, help="default: nccl with CUDA, gloo otherwise"
    )
    par.add_argument(
        "--distributed-timeout-minutes",
        type=_positive_float,
        default=10.0,
        help="collectives (process groups, SP groups) fail after this long; a rank that makes no "
        "iteration progress for 80%% of it dumps its stacks, names the ranks that went silent and "
        "exits (exit code 4)",
    )
    par.add_argument(
        "--context-parallel-size",
        type=_positive_int,
        default=None,
        help="the SP degree of --sp-mode static (vanilla Megatron CP / Ulysses); default: the smallest "
        "degree that holds --seq-length",
    )
    par.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    par.add_argument(
        "--attention-backend",
        default="auto",
        choices=sorted(_ATTN_ALIASES),
        help="sdpa (CPU/GPU), flash (flash-attn varlen), te (Transformer Engine); Megatron names "
        "fused->te, unfused/local->sdpa; auto: te or flash when installed on GPU, else sdpa",
    )
    par.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1, help="only 1 is supported")
    par.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1, help="only 1 is supported")


def _flexsp_flags(f: argparse._ArgumentGroup) -> None:
    f.add_argument("--sp-mode", choices=list(SP_MODES), default="flexsp")
    f.add_argument(
        "--flexsp-cost-model",
        default=None,
        help="cost-model JSON (flexsp-profile) or preset name; default 'cpu-tiny' on CPU. Without one that "
        "fits the model (layers, hidden, heads), the run starts from an analytic prior built from the "
        "model shape and a quick measurement of the device, and calibrates it online",
    )
    f.add_argument(
        "--flexsp-time-limit",
        type=_time_limit,
        default=None,
        metavar="auto|SECONDS",
        help="planner time limit per global batch (s), which bounds the whole solve; also the longest "
        "wait for a late plan. auto (default): 5%% of the measured iteration time, at most "
        f"{AUTO_TIME_LIMIT_CAP_S:g} s",
    )
    f.add_argument(
        "--flexsp-gap",
        type=_nonneg_float,
        default=0.01,
        help="the planner stops improving once its plan is within this fraction of the lower bound",
    )
    f.add_argument(
        "--flexsp-calibrate",
        choices=["on", "off"],
        default="on",
        help="refit the cost model from the measured time of every SP group while training; later "
        "plans use the refitted model",
    )
    f.add_argument(
        "--flexsp-save-calibrated",
        default=None,
        metavar="FILE",
        help="write the calibrated cost model here at the end (and at every checkpoint); "
        "--flexsp-cost-model and flexsp-plan accept it",
    )
    f.add_argument(
        "--flexsp-plan-ahead",
        type=_nonneg_int,
        default=2,
        help="global batches planned ahead in a background process on rank 0 (0: plan inline)",
    )
    f.add_argument("--flexsp-dump-plans", default=None, metavar="DIR", help="write every plan as JSON here")
    f.add_argument(
        "--flexsp-profile",
        default=None,
        metavar="FILE",
        help="profile this model on these ranks instead of training (as flexsp-profile does) and write "
        "the cost-model JSON to FILE",
    )
    f.add_argument(
        "--flexsp-compare-with",
        choices=[m for m in SP_MODES if m != "flexsp"],
        default=None,
        help="also run every global batch under this baseline's plan (same model, same batch, right "
        "before the real step; its gradients are dropped) and log both times: a paired comparison "
        "in the same run conditions, immune to load drift on shared machines",
    )
    f.add_argument(
        "--flexsp-sharding",
        choices=["fsdp2", "ddp"],
        default="fsdp2",
        help="model-state sharding: fsdp2 (ZeRO-3) or ddp (replicated, for debugging)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_flexsp.py",
        description="GPT pre-training with FlexSP heterogeneous sequence parallelism (Megatron-style flags).",
        allow_abbrev=False,
    )
    _model_flags(p.add_argument_group("model"))
    _training_flags(p.add_argument_group("training"))
    _data_flags(p.add_argument_group("data"))
    _checkpoint_flags(p.add_argument_group("checkpointing"))
    _logging_flags(p.add_argument_group("logging"))
    _parallelism_flags(p.add_argument_group("parallelism"))
    _flexsp_flags(p.add_argument_group("flexsp"))
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (unknown flags stop argparse with its usage message) and fill derived defaults."""
    args = build_parser().parse_args(argv)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.mock_data_median is None:
        args.mock_data_median = max(args.mock_data_min_len, args.seq_length // 16)
    args.attention_backend = _ATTN_ALIASES[args.attention_backend]
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


def _err(msg: str) -> None:
    raise ArgumentError(msg)


def _validate_model(args: argparse.Namespace) -> None:
    """Model shape: heads, query groups, positions, dropout, no TP/PP."""
    heads, groups = args.num_attention_heads, args.num_query_groups
    if args.hidden_size % heads:
        _err(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}")
    if heads % groups:
        _err(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
    if groups != heads and not args.group_query_attention:
        _err(f"--num-query-groups {groups} differs from --num-attention-heads {heads}: add --group-query-attention")
    if args.seq_length > args.max_position_embeddings:
        _err(f"--seq-length {args.seq_length} is above --max-position-embeddings {args.max_position_embeddings}")
    for name in ("hidden_dropout", "attention_dropout"):
        if getattr(args, name) >= 1.0:
            _err(f"--{name.replace('_', '-')} must be below 1, got {getattr(args, name)}")
    if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
        _err(
            "--tensor-model-parallel-size and --pipeline-model-parallel-size must be 1: FlexSP shards model states "
            "with ZeRO-3 over all ranks and uses every rank for sequence parallelism"
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
    if args.eval_interval and args.split and _parse_split(args.split)[1] <= 0:
        _err(f"--eval-interval {args.eval_interval} needs a validation share in --split (got {args.split!r})")
    if args.flexsp_gap >= 1:
        _err(f"--flexsp-gap must be below 1 (a fraction of the lower bound), got {args.flexsp_gap}")
    if args.flexsp_compare_with is not None and args.flexsp_compare_with == args.sp_mode:
        _err(f"--flexsp-compare-with {args.flexsp_compare_with} is the --sp-mode itself; pick another mode")


def validate_args(args: argparse.Namespace, world_size: int, *, has_cuda: bool) -> None:
    """Stop with a clear message on any conflicting or impossible setting (before any work).

    Pure: no process group needed. ``validate_against_cost`` then checks what depends on the
    starting cost model (``cost_setup.resolve_cost_model``, which needs a valid model shape).
    """
    if world_size <= 0:
        _err(f"world size must be positive, got {world_size}")
    _validate_model(args)
    _validate_training(args)
    _validate_devices(args, has_cuda)
    _validate_data(args)
    _validate_run(args)


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
        _err(
            f"--seq-length {args.seq_length} does not fit any SP group: the largest ({biggest} ranks) holds "
            f"{cost.capacity(biggest)} tokens under cost model '{cost.name}'; lower --seq-length or add ranks"
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
