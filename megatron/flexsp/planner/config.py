"""How to plan: the planner's settings and their defaults, in one place.

Why a module of its own: the api, the CLI's argument parser, the global-batch search and the
trainer's flags all default to the same values (time limit, gap, ...); they read them from
``PlannerConfig``'s fields here instead of restating them, and this module imports nothing of
the solver, so every layer can read it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .recompute import RECOMPUTE_CHOICES

__all__ = ["METHODS", "FALLBACK_TIME_S", "PlannerConfig"]

METHODS = ("flexsp", "static", "batch-adaptive", "megatron-hybrid-cp", "megatron-dynamic-cp")
FALLBACK_TIME_S = 0.05  # fallback_plan's budget for flexsp


@dataclass
class PlannerConfig:
    """How to plan: ``static_degree`` forces the static degree (the trainer's --context-parallel-size);
    ``max_seq_len`` is the longest length the run is configured for (static sizes its degree for it);
    ``time_limit_s`` bounds the whole flexsp solve; ``gap``: stop improving once the plan is within
    this fraction of the lower bound; ``work_limit``: instead of the clock, a budget of micro-batch
    solves, so that the same batch always gets the same plan (resumed runs, any machine); ``seed``:
    the run's seed, kept with the settings (the search itself has no randomness); ``recompute``: the
    activation recomputation of every group ("none", "selective", "full"; the cost model must have the
    mode's coefficients), or "auto": per group the fastest mode whose memory fits."""

    world_size: int
    method: str = "flexsp"
    time_limit_s: float = 2.0
    max_seq_len: int | None = None
    static_degree: int | None = None
    seed: int = 0
    gap: float = 0.01
    work_limit: int | None = None
    recompute: str = "none"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"planner method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"planner recompute must be one of {', '.join(RECOMPUTE_CHOICES)}; got {self.recompute!r}")
        for name in ("world_size", "max_seq_len", "static_degree"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"planner {name} must be an integer, got {v!r}")
            if v is not None:
                setattr(self, name, int(v))
        if self.world_size < 1:
            raise ValueError(f"planner world_size must be a positive integer, got {self.world_size!r}")
        if not self.time_limit_s > 0:
            raise ValueError(f"planner time_limit_s must be > 0, got {self.time_limit_s!r}")
        if self.work_limit is not None and (
            isinstance(self.work_limit, bool)
            or not isinstance(self.work_limit, numbers.Integral)
            or self.work_limit < 1
        ):
            raise ValueError(f"planner work_limit must be a positive integer, got {self.work_limit!r}")
        if isinstance(self.gap, bool) or not isinstance(self.gap, numbers.Real) or not 0 <= self.gap < 1:
            raise ValueError(f"planner gap must be a number in [0, 1), got {self.gap!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"planner max_seq_len must be >= 1, got {self.max_seq_len!r}")
        if self.static_degree is not None and self.static_degree < 1:
            raise ValueError(f"planner static_degree must be >= 1, got {self.static_degree!r}")
