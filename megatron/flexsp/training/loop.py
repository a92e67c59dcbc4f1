"""Entry point of pretrain_gpt_flexsp.py: parse, validate, then train (or profile) on this rank.

Why so thin: launching (torchrun / SLURM environment, process group, exit codes) lives in
``distributed``, configuration in ``configs``, the training itself in ``trainer.Trainer``; this
module only wires them in order, so the same pieces serve tests, the profiler and the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron.flexsp.planner.costmodel import CostModelError

from . import arguments as A
from .checkpointing import CheckpointError
from .configs import TrainerConfigs, configs_from_args
from .distributed import LaunchEnv, launch_env, run_entrypoint
from .logging_utils import IterationRecord
from .profiler import ProfileError, profile
from .resilience import EXIT_NONFINITE, TooManySkippedSteps
from .trainer import Trainer

__all__ = ["main", "train", "USER_ERRORS"]

# Exceptions that mean "the settings, inputs or checkpoint are wrong": one line, exit code 2.
USER_ERRORS = (A.ArgumentError, CheckpointError, CostModelError, ProfileError)


def train(cfg: TrainerConfigs, env: LaunchEnv) -> list[IterationRecord]:
    """Train with validated configs on this rank; returns rank 0's records (an empty list elsewhere)."""
    trainer = Trainer(cfg, env)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, train (or --flexsp-profile); a clear one-line error (exit code 2) for bad settings."""
    args = A.parse_args(argv)

    def body() -> None:
        env = launch_env()
        if args.flexsp_profile:
            profile(args, env)
            return
        train(configs_from_args(args, env), env)

    return run_entrypoint("pretrain_gpt_flexsp.py", body, USER_ERRORS, {TooManySkippedSteps: EXIT_NONFINITE})
