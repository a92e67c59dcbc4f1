"""flexsp-profile's settings and flags: what to measure, how often, and against which memory limit.

Why apart: the flags are read by two parsers (flexsp-profile's own, and the trainer's for
``--flexsp-profile``), and the measurements must not depend on how they were given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron.flexsp.planner.fitting import FitError

__all__ = ["ProfileError", "ProfileConfig", "add_profiler_args", "profile_config_from_args", "geometric"]


# A profile that cannot be fitted or measured is the user's to fix (settings, lengths, memory): the
# planner's fitting error is that same error, so the profiler raises and documents one class.
ProfileError = FitError


@dataclass
class ProfileConfig:
    output: str = "cost_model.json"
    lengths: list[int] | None = None  # compute lengths at degree 1 (default: geometric up to max_len)
    max_len: int = 2048  # longest sequence profiled (the trainer's --seq-length), capped by memory
    repeats: int = 5
    warmup: int = 2
    memory_limit_gb: float | None = None
    capacity_tokens: int | None = None
    memory_fraction: float = 0.9  # GPU default limit: this share of the device memory
    gpus_per_node: int | None = None
    a2a_repeats: int = 5
    sharding: str = "fsdp2"
    name: str | None = None
    stat: str = "median"  # of repeated timings: median, or min on a machine shared with other work
    recompute: bool = True  # also measure the recompute modes (the cost model's optional "recompute" key)
    recompute_method: str | None = None  # the run's --recompute-method / -num-layers / -modules
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None
    tensor_model_parallel_size: int = 1  # > 1: also time the all-reduce of t-rank TP groups (the "tensor_parallel" key)

    def validate(self) -> None:
        if self.tensor_model_parallel_size < 1:
            raise ProfileError(f"--tensor-model-parallel-size must be >= 1, got {self.tensor_model_parallel_size}")
        if self.lengths is not None and (not self.lengths or any(s < 1 for s in self.lengths)):
            raise ProfileError(f"--profile-lengths must be positive token counts, got {self.lengths}")
        if self.repeats < 1 or self.a2a_repeats < 1 or self.warmup < 0:
            raise ProfileError("--profile-repeats and --profile-a2a-repeats must be >= 1, --profile-warmup >= 0")
        if self.memory_limit_gb is not None and self.capacity_tokens is not None:
            raise ProfileError("give --memory-limit-gb or --capacity-tokens, not both")
        if self.memory_limit_gb is not None and not self.memory_limit_gb > 0:
            raise ProfileError(f"--memory-limit-gb must be > 0, got {self.memory_limit_gb}")
        if self.capacity_tokens is not None and self.capacity_tokens < 1:
            raise ProfileError(f"--capacity-tokens must be >= 1, got {self.capacity_tokens}")
        if self.stat not in ("median", "min"):
            raise ProfileError(f"--profile-stat must be median or min, got {self.stat!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ProfileError(f"--memory-fraction must be in (0, 1], got {self.memory_fraction}")


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_profiler_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The profiler's own flags (the model flags are the trainer's)."""
    g = parser.add_argument_group("flexsp-profile")
    g.add_argument("--output", "-o", default="cost_model.json", help="cost-model JSON to write")
    g.add_argument(
        "--profile-lengths",
        type=_int_list,
        default=None,
        help="sequence lengths timed at degree 1 (default: 6 lengths, geometric up to --seq-length)",
    )
    g.add_argument("--profile-repeats", type=int, default=5, help="timed repetitions per sample (median kept)")
    g.add_argument("--profile-warmup", type=int, default=2, help="untimed repetitions before each sample")
    g.add_argument("--profile-a2a-repeats", type=int, default=5)
    g.add_argument(
        "--profile-stat",
        choices=["median", "min"],
        default="median",
        help="statistic of repeated timings (min on a machine shared with other work)",
    )
    g.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="usable memory per GPU (default: --memory-fraction of the device; on CPU half of the "
        "available RAM per local rank)",
    )
    g.add_argument(
        "--capacity-tokens",
        type=int,
        default=None,
        help="instead of --memory-limit-gb: set the limit so one GPU holds this many tokens",
    )
    g.add_argument("--memory-fraction", type=float, default=0.9)
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: LOCAL_WORLD_SIZE (torchrun)")
    g.add_argument("--cost-model-name", default=None)
    g.add_argument(
        "--profile-recompute",
        choices=["on", "off"],
        default="on",
        help="also measure activation memory, compute and all-to-all factors of selective and full "
        "recomputation (with the run's --recompute-* settings)",
    )
    return parser


def profile_config_from_args(args: argparse.Namespace) -> ProfileConfig:
    """ProfileConfig from a namespace; flags the trainer's parser lacks take their defaults."""
    d = ProfileConfig()
    get = lambda k, default: getattr(args, k, default) if getattr(args, k, None) is not None else default  # noqa: E731
    cfg = ProfileConfig(
        output=get("output", None) or get("flexsp_profile", d.output),
        lengths=get("profile_lengths", None),
        max_len=int(args.seq_length),
        repeats=get("profile_repeats", d.repeats),
        warmup=get("profile_warmup", d.warmup),
        memory_limit_gb=get("memory_limit_gb", None),
        capacity_tokens=get("capacity_tokens", None),
        memory_fraction=get("memory_fraction", d.memory_fraction),
        gpus_per_node=get("gpus_per_node", None),
        a2a_repeats=get("profile_a2a_repeats", d.a2a_repeats),
        sharding=get("flexsp_sharding", d.sharding),
        name=get("cost_model_name", None),
        stat=get("profile_stat", d.stat),
        recompute=get("profile_recompute", "on") == "on",
        recompute_method=get("recompute_method", None),
        recompute_num_layers=get("recompute_num_layers", None),
        recompute_modules=get("recompute_modules", None),
        tensor_model_parallel_size=get("tensor_model_parallel_size", d.tensor_model_parallel_size),
    )
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------ profiling


def geometric(lo: int, hi: int, n: int) -> list[int]:
    """About ``n`` distinct integers from ``lo`` to ``hi``, evenly spaced on a log scale."""
    if hi <= lo:
        return [hi]
    return sorted({int(round(lo * (hi / lo) ** (i / (n - 1)))) for i in range(n)})
