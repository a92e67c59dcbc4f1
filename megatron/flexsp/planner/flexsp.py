"""FlexSP planning entry points, kept at their historical import path.

Why a thin module: the planner was split along its seams (``micro_batch.py`` solves one
micro-batch, ``global_batch.py`` searches the micro-batches of a global batch under one
deadline), but the trainer, the CLI, the api and user scripts import ``plan_flexsp`` and
``greedy_plan`` from here. Everything is re-exported; read the two modules for how it works.
"""

from __future__ import annotations

from .global_batch import DEFAULT_GAP, _safe_plan, _to_plan, greedy_plan, plan_flexsp
from .micro_batch import MBSolution, PlannerContext, exact_micro_batch, solve_micro_batch

__all__ = [
    "plan_flexsp",
    "greedy_plan",
    "MBSolution",
    "solve_micro_batch",
    "exact_micro_batch",
    "PlannerContext",
    "DEFAULT_GAP",
    "_safe_plan",
    "_to_plan",
]
