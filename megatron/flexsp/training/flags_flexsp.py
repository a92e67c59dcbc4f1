"""The parallelism and FlexSP flags of pretrain_gpt_flexsp.py (the rest: ``flags``).

Why apart: the planner's and the runtime's own knobs grew with every issue; the Megatron flags
(model, training, data, checkpoints, logging) read better without them. Defaults come from the
configs' dataclasses, as in ``flags``.
"""

from __future__ import annotations

import argparse

from megatron.flexsp.planner.api import METHODS as SP_MODES
from megatron.flexsp.runtime.model import GPTConfig

from .config_types import (
    AUTO_TIME_LIMIT_CAP_S,
    AUTO_TIME_LIMIT_FRACTION,
    AUTO_TIME_LIMIT_MIN_S,
    DistributedConfig,
    FlexSPConfig,
)
from .flag_types import ATTN_ALIASES, nonneg_float, nonneg_int, positive_float, positive_int, time_limit
from .resilience import EXIT_HUNG, WATCHDOG_SHARE_OF_TIMEOUT

__all__ = ["flexsp_planner_flags", "flexsp_run_flags", "parallelism_flags"]


def parallelism_flags(par: argparse._ArgumentGroup) -> None:
    par.add_argument(
        "--distributed-backend", choices=["nccl", "gloo"], default=None, help="default: nccl with CUDA, gloo otherwise"
    )
    par.add_argument(
        "--distributed-timeout-minutes",
        type=positive_float,
        default=DistributedConfig.timeout_minutes,
        help="collectives (process groups, SP groups) fail after this long; a rank that makes no "
        f"iteration progress for {WATCHDOG_SHARE_OF_TIMEOUT:.0%}% of it dumps its stacks, names the ranks "
        f"that went silent and exits (exit code {EXIT_HUNG})",
    )
    par.add_argument(
        "--context-parallel-size",
        type=positive_int,
        default=None,
        help="the SP degree of --sp-mode static (vanilla Megatron CP / Ulysses); default: the smallest "
        "degree that holds --seq-length",
    )
    par.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=GPTConfig.transformer_impl)
    par.add_argument(
        "--attention-backend",
        default="auto",
        choices=sorted(ATTN_ALIASES),
        help="sdpa (CPU/GPU), flash (flash-attn varlen), te (Transformer Engine); Megatron names "
        "fused->te, unfused/local->sdpa; auto: te or flash when installed on GPU, else sdpa",
    )
    par.add_argument(
        "--tensor-model-parallel-size",
        type=positive_int,
        default=1,
        help="TP size t: the ranks form world/t units of t consecutive ranks inside a node (one TP group each), "
        "and the planner builds SP groups from whole units",
    )
    par.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron's TP-sequence parallelism (activations split over the TP group); needs NCCL reduce-scatter",
    )
    par.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1, help="only 1 is supported")


def flexsp_planner_flags(f: argparse._ArgumentGroup) -> None:
    """How plans are made: the sp-mode, the cost model and its calibration, the planner's budget."""
    f.add_argument(
        "--sp-mode",
        choices=list(SP_MODES),
        default=FlexSPConfig.sp_mode,
        help="flexsp: heterogeneous SP groups planned per batch; static: one degree (vanilla Megatron CP a2a / "
        "Ulysses); batch-adaptive: the best single degree per batch; megatron-hybrid-cp: the rule of "
        "megatron.core's BalancedCPScheduler; megatron-dynamic-cp: the rule of Megatron-LM's "
        "--dynamic-context-parallel (power-of-two CP sizes, s^2/c workload)",
    )
    f.add_argument(
        "--flexsp-cost-model",
        default=None,
        help="cost-model JSON (flexsp-profile) or preset name; default 'cpu-tiny' on CPU. Without one that "
        "fits the model (layers, hidden, heads), the run starts from an analytic prior built from the "
        "model shape and a quick measurement of the device, and calibrates it online",
    )
    f.add_argument(
        "--flexsp-time-limit",
        type=time_limit,
        default=FlexSPConfig.time_limit_s,
        metavar="auto|SECONDS",
        help="planner time limit per global batch (s), which bounds the whole solve; also the longest "
        f"wait for a late plan. auto (default): {AUTO_TIME_LIMIT_FRACTION:.0%}% of the measured iteration "
        f"time, from {AUTO_TIME_LIMIT_MIN_S:g} s to {AUTO_TIME_LIMIT_CAP_S:g} s",
    )
    f.add_argument(
        "--flexsp-gap",
        type=nonneg_float,
        default=FlexSPConfig.gap,
        help="the planner stops improving once its plan is within this fraction of the lower bound",
    )
    f.add_argument(
        "--flexsp-calibrate",
        choices=["on", "off"],
        default="on" if FlexSPConfig.calibrate else "off",
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
        type=nonneg_int,
        default=FlexSPConfig.plan_ahead,
        help="global batches planned ahead in a background process on rank 0 (0: plan inline)",
    )


def flexsp_run_flags(f: argparse._ArgumentGroup) -> None:
    """What else a run does with plans and model states: dumps, profiling, a paired baseline, sharding."""
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
        default=FlexSPConfig.sharding,
        help="model-state sharding: fsdp2 (ZeRO-3) or ddp (replicated, for debugging)",
    )
