"""The flags of pretrain_gpt_flexsp.py, by concern: Megatron's names and meanings (here), parallelism and FlexSP's own
(``flags_flexsp``).

Why apart from ``arguments`` (parsing's derived defaults and validation): the parser is the
command line's documentation, and every default it shares with a config is read from that
config's dataclass (``config_types``, the runtime's ``GPTConfig``, the data's ``DataConfig``),
so the command line, the configs and the components built without argparse agree.
"""

from __future__ import annotations

import argparse
from dataclasses import fields as dataclass_fields

from megatron.flexsp.data.build import DataConfig
from megatron.flexsp.planner.api import METHODS as SP_MODES
from megatron.flexsp.planner.model_presets import MODEL_ARCHS, MODEL_PRESET_NAMES
from megatron.flexsp.runtime.model import GPTConfig

from .config_types import (
    LoggingConfig,
    OptimizerConfig,
    TrainConfig,
)
from .flag_types import ATTN_ALIASES, nonneg_float, nonneg_int, positive_float, positive_int
from .flags_flexsp import flexsp_planner_flags, flexsp_run_flags, parallelism_flags
from .resilience import EXIT_NONFINITE

__all__ = ["ATTN_ALIASES", "SP_MODES", "build_parser", "preset_flag_defaults"]


def _model_flags(m: argparse._ArgumentGroup) -> None:
    m.add_argument("--num-layers", type=positive_int, default=2)
    m.add_argument("--hidden-size", type=positive_int, default=64)
    m.add_argument("--ffn-hidden-size", type=positive_int, default=None, help="default 4*hidden (or the SwiGLU size)")
    m.add_argument("--num-attention-heads", type=positive_int, default=4)
    m.add_argument("--group-query-attention", action="store_true")
    m.add_argument("--num-query-groups", type=positive_int, default=None)
    m.add_argument(
        "--position-embedding-type", choices=["learned_absolute", "rope"], default=GPTConfig.position_embedding_type
    )
    m.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default=GPTConfig.normalization)
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--max-position-embeddings", type=positive_int, default=None, help="default: --seq-length")
    m.add_argument(
        "--seq-length",
        type=positive_int,
        default=2048,
        help="longest document kept (tokens of model input); longer ones are truncated or dropped (--overlong)",
    )
    m.add_argument("--vocab-size", type=positive_int, default=None, help="default: the tokenizer's vocabulary")
    m.add_argument(
        "--tokenizer-type",
        default=None,
        help="ByteTokenizer (built in, no download; the default corpus uses it) or HuggingFaceTokenizer "
        "with --tokenizer-model",
    )
    m.add_argument("--tokenizer-model", default=None, help="local path of a HuggingFace tokenizer")
    m.add_argument("--init-method-std", type=float, default=GPTConfig.init_method_std)
    m.add_argument("--rotary-base", type=positive_int, default=GPTConfig.rotary_base)
    m.add_argument(
        "--hidden-dropout",
        type=nonneg_float,
        default=GPTConfig.hidden_dropout,
        help="default 0 (Megatron: 0.1): with dropout, sp-modes no longer give bit-comparable losses",
    )
    m.add_argument(
        "--attention-dropout", type=nonneg_float, default=GPTConfig.attention_dropout, help="default 0 (Megatron: 0.1)"
    )
    _checkpoint_model_flags(m)


def _checkpoint_model_flags(m: argparse._ArgumentGroup) -> None:
    """Architecture flags of real checkpoints (Llama, Qwen2, Mistral), Megatron's names and meanings."""
    m.add_argument(
        "--model-preset",
        choices=MODEL_PRESET_NAMES,
        default=None,
        help="set the architecture flags of this model (from its published config.json); flags given "
        "explicitly override the preset. The cost-model preset of the same name is --flexsp-cost-model NAME",
    )
    m.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="separate output-layer weights (Llama, Mistral, Qwen2.5-7B); without it the output layer reuses "
        "the word embeddings (tied), as in Megatron",
    )
    m.add_argument("--norm-epsilon", type=positive_float, default=GPTConfig.norm_epsilon, help="RMSNorm/LayerNorm eps")
    m.add_argument("--add-qkv-bias", action="store_true", help="a bias on the q, k, v projections only (Qwen2)")
    m.add_argument(
        "--disable-bias-linear",
        action="store_true",
        help="accepted for Megatron compatibility: FlexSP's linear layers have no bias already",
    )
    m.add_argument(
        "--use-rope-scaling", action="store_true", help="Llama 3.1's RoPE frequency scaling (original context 8192)"
    )
    m.add_argument("--rope-scaling-factor", type=positive_float, default=GPTConfig.rope_scaling_factor)
    m.add_argument(
        "--make-vocab-size-divisible-by",
        type=positive_int,
        default=128,
        help="pad the embedding table to a multiple of this (Megatron's default 128); the pad rows are "
        "never a target or an input",
    )


def preset_flag_defaults(name: str) -> dict[str, object]:
    """The argparse defaults ``--model-preset name`` sets (flags given explicitly still win)."""
    arch = MODEL_ARCHS[name]
    d: dict[str, object] = {f.name: getattr(arch, f.name) for f in dataclass_fields(arch) if f.name != "source"}
    d["position_embedding_type"] = "rope"
    d["group_query_attention"] = arch.num_query_groups != arch.num_attention_heads
    return d


def _training_flags(t: argparse._ArgumentGroup) -> None:
    t.add_argument(
        "--global-batch-size",
        type=positive_int,
        default=TrainConfig.global_batch_size,
        help="documents per global batch",
    )
    t.add_argument(
        "--micro-batch-size",
        type=positive_int,
        default=TrainConfig.micro_batch_size,
        help="accepted for Megatron compatibility and ignored: the planner chooses micro-batches",
    )
    t.add_argument("--train-iters", type=positive_int, default=TrainConfig.train_iters)
    t.add_argument("--lr", type=nonneg_float, default=OptimizerConfig.lr)
    t.add_argument("--min-lr", type=nonneg_float, default=OptimizerConfig.min_lr)
    t.add_argument("--lr-warmup-iters", type=nonneg_int, default=OptimizerConfig.lr_warmup_iters)
    t.add_argument("--lr-decay-iters", type=positive_int, default=None, help="default: --train-iters")
    t.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default=OptimizerConfig.lr_decay_style)
    t.add_argument("--weight-decay", type=nonneg_float, default=OptimizerConfig.weight_decay)
    t.add_argument(
        "--clip-grad",
        type=nonneg_float,
        default=OptimizerConfig.clip_grad,
        help="global gradient-norm clip; 0 disables",
    )
    t.add_argument("--adam-beta1", type=float, default=OptimizerConfig.adam_beta1)
    t.add_argument("--adam-beta2", type=float, default=OptimizerConfig.adam_beta2)
    t.add_argument("--adam-eps", type=float, default=OptimizerConfig.adam_eps)
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU only)")
    t.add_argument(
        "--eval-interval",
        type=nonneg_int,
        default=TrainConfig.eval_interval,
        help="validate every N iterations; 0 disables",
    )
    t.add_argument(
        "--eval-iters", type=positive_int, default=TrainConfig.eval_iters, help="global batches per validation"
    )
    t.add_argument(
        "--exit-interval",
        type=positive_int,
        default=None,
        help="save (if --save) and exit after the iteration divisible by this value",
    )
    t.add_argument(
        "--max-skipped-steps",
        type=positive_int,
        default=TrainConfig.max_skipped_steps,
        help="a step whose loss or gradient norm is not finite is skipped (no update); this many in a "
        f"row stop the run with exit code {EXIT_NONFINITE}",
    )
    _recompute_flags(t)


def _recompute_flags(t: argparse._ArgumentGroup) -> None:
    """Megatron's activation-recomputation flags (checked against the model in arguments.validate_args)."""
    t.add_argument(
        "--recompute-granularity",
        choices=["full", "selective", "auto"],
        default=None,
        help="activation recomputation (default none): full re-runs whole layers in backward, selective the "
        "--recompute-modules; auto lets the planner choose none/selective/full per SP group of each micro-batch",
    )
    t.add_argument(
        "--recompute-method",
        choices=["uniform", "block"],
        default=None,
        help="full: uniform checkpoints chunks of --recompute-num-layers layers, block the first "
        "--recompute-num-layers layers (default uniform)",
    )
    t.add_argument(
        "--recompute-num-layers",
        type=int,
        default=None,
        help="layers per chunk (uniform) or recomputed (block); default 1",
    )
    t.add_argument(
        "--recompute-modules",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="selective: core_attn (the all-to-all attention, default) and/or mlp",
    )


def _data_flags(d: argparse._ArgumentGroup) -> None:
    d.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="Megatron .bin/.idx prefixes, optionally with weights: [W1] PREFIX1 [W2] PREFIX2 ...; "
        "default (without --mock-data): a corpus built from the Python standard library sources",
    )
    d.add_argument("--split", default=DataConfig.split, help="train,valid,test weights of the documents")
    d.add_argument("--mock-data", action="store_true", help="random tokens with a long-tail length distribution")
    d.add_argument("--mock-data-num-docs", type=positive_int, default=20000)
    d.add_argument(
        "--mock-data-median",
        type=positive_int,
        default=None,
        help="default: --seq-length / 16, at least --mock-data-min-len",
    )
    d.add_argument("--mock-data-sigma", type=nonneg_float, default=1.0)
    d.add_argument("--mock-data-tail-frac", type=nonneg_float, default=0.05)
    d.add_argument("--mock-data-pareto-alpha", type=nonneg_float, default=1.2)
    d.add_argument("--mock-data-min-len", type=positive_int, default=16)
    d.add_argument(
        "--mock-data-max-len",
        type=positive_int,
        default=None,
        help="longest generated document (default: --seq-length; longer ones exercise --overlong)",
    )
    d.add_argument(
        "--overlong",
        choices=["truncate", "drop"],
        default=DataConfig.overlong,
        help="what happens to documents longer than --seq-length",
    )
    d.add_argument(
        "--stdlib-granularity",
        choices=["toplevel", "file"],
        default=DataConfig.stdlib_granularity,
        help="documents of the default corpus: one per top-level def/class block (long-tailed, "
        "median ~500 tokens) or one per stdlib file",
    )


def _checkpoint_flags(c: argparse._ArgumentGroup) -> None:
    from .config_types import CheckpointConfig

    c.add_argument("--save", default=None, help="checkpoint directory to write")
    c.add_argument("--load", default=None, help="checkpoint directory to resume from")
    c.add_argument("--save-interval", type=positive_int, default=None)
    c.add_argument("--no-save-final", action="store_true", help="do not save at the end of training")
    c.add_argument(
        "--keep-latest-k",
        type=positive_int,
        default=None,
        help="keep only the newest K checkpoints in --save (default: keep all)",
    )
    c.add_argument(
        "--load-step",
        type=positive_int,
        default=None,
        help="resume from this iteration's checkpoint instead of the newest one",
    )
    c.add_argument(
        "--ckpt-format",
        choices=["torch", "torch_dist"],
        default=CheckpointConfig.ckpt_format,
        help="torch_dist: every rank writes its own model/optimizer shards (torch.distributed.checkpoint), "
        "loadable on any number of ranks; torch: full state dicts gathered to rank 0 (both are loadable)",
    )
    c.add_argument(
        "--async-save",
        action="store_true",
        help="write torch_dist checkpoints in the background, overlapped with the next iterations (at most "
        "one in flight; the final save and exit wait for it)",
    )
    c.add_argument(
        "--finetune",
        action="store_true",
        help="with --load: take only the model weights, start at iteration 0 with a fresh optimizer, LR "
        "schedule, data position and RNG (a model-only checkpoint, e.g. from flexsp-convert, is enough); a "
        "relaunch whose --save already holds a checkpoint resumes from that one instead",
    )
    c.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, take this run's LR-schedule flags instead of refusing a changed schedule",
    )
    _exit_flags(c)


def _exit_flags(c: argparse._ArgumentGroup) -> None:
    """When a run saves and exits on its own: a signal or a wall-clock deadline (same group as checkpoints)."""
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
        type=positive_float,
        default=None,
        help="save (if --save) and exit 0 at the first iteration boundary after this many minutes",
    )


def _logging_flags(lg: argparse._ArgumentGroup) -> None:
    lg.add_argument("--log-interval", type=positive_int, default=LoggingConfig.log_interval)
    lg.add_argument("--tensorboard-dir", default=None)
    lg.add_argument("--wandb-project", default=None)
    lg.add_argument("--wandb-exp-name", default=None)
    lg.add_argument("--metrics-file", default=None, help="append one JSON object per logged iteration")
    lg.add_argument("--no-progress-bar", action="store_true")


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
    parallelism_flags(p.add_argument_group("parallelism"))
    flexsp = p.add_argument_group("flexsp")
    flexsp_planner_flags(flexsp)
    flexsp_run_flags(flexsp)
    return p
