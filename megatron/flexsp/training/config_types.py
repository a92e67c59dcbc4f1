"""The trainer's config dataclasses, one per concern, and the one place their defaults are written.

Why a module of its own: the argument parser (``flags``) reads every default it shares with a
config from here, and ``configs.configs_from_args`` fills these configs from the validated flags;
both depend on this module and it depends on neither, so a default is changed in one line and
the command line, the configs and the components built without argparse (tests) agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.flexsp.planner.api import PlannerConfig
from megatron.flexsp.runtime.recompute import RecomputeConfig

__all__ = [
    "AUTO_TIME_LIMIT_FRACTION",
    "AUTO_TIME_LIMIT_MIN_S",
    "AUTO_TIME_LIMIT_CAP_S",
    "OptimizerConfig",
    "TrainConfig",
    "FlexSPConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "DistributedConfig",
]

# --flexsp-time-limit auto: this share of the measured iteration time, within [min, cap] seconds.
# 5%: on the 4 x 32 benchmark the plan at a 20 ms budget is within 0.2% of the one at 50 ms, and the
# background planner's CPU share of a standalone run fell from ~8% (at 10%) to ~5%.
AUTO_TIME_LIMIT_FRACTION = 0.05
AUTO_TIME_LIMIT_MIN_S = 0.02
AUTO_TIME_LIMIT_CAP_S = 2.0


@dataclass
class OptimizerConfig:
    """AdamW and Megatron's LR schedule."""

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables
    lr_warmup_iters: int = 0
    lr_decay_iters: int = field(kw_only=True)  # no default of its own: --train-iters
    lr_decay_style: str = "cosine"


@dataclass
class TrainConfig:
    """How long to train, on what batches, and when to validate."""

    train_iters: int = 20
    global_batch_size: int = 32  # documents per global batch
    seed: int = 1234
    eval_interval: int = 0
    eval_iters: int = 2
    micro_batch_size: int | None = None  # Megatron's flag, accepted and ignored: the planner picks micro-batches
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops


@dataclass
class FlexSPConfig:
    """How every global batch is planned (the sp-mode, the planner's budget) and run."""

    sp_mode: str = "flexsp"
    time_limit_s: float | None = None  # None: automatic, a share of the measured iteration time
    seq_length: int = field(kw_only=True)
    gap: float = PlannerConfig.gap
    calibrate: bool = True
    save_calibrated: str | None = None
    plan_ahead: int = 2  # global batches planned ahead in a background process (0: inline)
    dump_plans: str | None = None
    sharding: str = "fsdp2"
    context_parallel_size: int | None = None
    compare_with: str | None = None  # the paired baseline (--flexsp-compare-with), a diagnostic
    seed: int = TrainConfig.seed  # --seed: the planner's seed is the run's
    # --recompute-* (Megatron's flags): None granularity is no recomputation; auto lets the planner choose
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None
    tensor_model_parallel_size: int = 1  # --tensor-model-parallel-size: the planner plans over world/t units

    def recompute_config(self) -> RecomputeConfig:
        """The runtime's recompute settings (a fixed mode, or auto: each plan group's own mode)."""
        return RecomputeConfig(
            granularity=self.recompute_granularity or "none",
            method=self.recompute_method,
            num_layers=self.recompute_num_layers,
            modules=None if self.recompute_modules is None else tuple(self.recompute_modules),
        )

    def planner_config(self, world_size: int, method: str | None = None) -> PlannerConfig:
        """The planner's settings for ``method`` (default: the sp-mode); static uses --context-parallel-size.
        ``world_size`` is in ranks; the planner gets the units of TP t (its cost model is the unit one)."""
        method = method or self.sp_mode
        return PlannerConfig(
            world_size=world_size // self.tensor_model_parallel_size,
            method=method,
            time_limit_s=self.time_limit_s or self.auto_time_limit(None),
            gap=self.gap,
            max_seq_len=self.seq_length,
            static_degree=self.context_parallel_size if method == "static" else None,
            seed=self.seed,
            recompute=self.recompute_granularity or "none",  # --recompute-granularity: auto lets the planner choose
        )

    @staticmethod
    def auto_time_limit(iteration_ms: float | None) -> float:
        """--flexsp-time-limit auto: a share of the measured iteration time (before any: the cap's tenth)."""
        if iteration_ms is None:
            return AUTO_TIME_LIMIT_CAP_S / 10
        limit = AUTO_TIME_LIMIT_FRACTION * iteration_ms / 1e3
        return min(AUTO_TIME_LIMIT_CAP_S, max(AUTO_TIME_LIMIT_MIN_S, limit))


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    metrics_file: str | None = None
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    """Where and when to save; ``exit_interval`` also ends the run (Megatron's --exit-interval)."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    save_final: bool = True
    exit_interval: int | None = None
    keep_latest_k: int | None = None
    load_step: int | None = None
    override_opt_param_scheduler: bool = False
    finetune: bool = False  # --finetune: weights only from --load, iteration 0, everything else fresh
    ckpt_format: str = "torch_dist"  # each rank writes its own shards (DCP); "torch": full state dicts on rank 0
    async_save: bool = False  # --async-save: torch_dist writes in the background
    exit_signal: str | None = None  # the signal that asks for save-and-exit (None: no handler)
    exit_duration_in_mins: float | None = None


@dataclass
class DistributedConfig:
    backend: str | None = None  # None: nccl with CUDA, gloo otherwise
    timeout_minutes: float = 10.0  # collectives and the progress watchdog
