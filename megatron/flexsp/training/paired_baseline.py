"""--flexsp-compare-with: each batch also runs under the baseline's plan, timed, around the real step.

Why a wrapper: the diagnostic is not part of the step. The step runs one plan and does not know
a baseline exists; this wrapper has the same call shape as the plain run and adds the baseline's
run before or after it (alternating by iteration, so both orders occur equally often). The
baseline's gradients are dropped; run second, the real step's gradients are stashed meanwhile,
so they survive untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from megatron.flexsp.planner.plan import Plan
from megatron.flexsp.runtime.executor import StepResult

__all__ = ["TimedRun", "StepRun", "plain_step", "PairedBaseline"]

TimedRun = Callable[[Plan, list[Tensor]], tuple[StepResult, float]]  # (result, wall ms)
StepRun = Callable[[int, Plan, list[Tensor]], tuple[StepResult, float, dict[str, Any]]]  # + record extras


def plain_step(run: TimedRun) -> StepRun:
    """The step without diagnostics: iteration ``k``'s plan, nothing extra to record."""

    def step(k: int, plan: Plan, seqs: list[Tensor]) -> tuple[StepResult, float, dict[str, Any]]:
        result, ms = run(plan, seqs)
        return result, ms, {}

    return step


@dataclass
class PairedBaseline:
    """A ``StepRun`` that also runs the batch under ``plan_baseline``'s plan and records its time and loss."""

    run: TimedRun
    plan_baseline: Callable[[list[int]], Plan]  # collective: every rank gets the same plan
    model: nn.Module
    optimizer: Any
    method: str

    def __call__(self, k: int, plan: Plan, seqs: list[Tensor]) -> tuple[StepResult, float, dict[str, Any]]:
        first = k % 2 == 0
        extra = self._baseline(list(plan.lengths), seqs, first=True) if first else {}
        result, ms = self.run(plan, seqs)  # gradients are global sums afterwards (fsdp2 and ddp)
        if not first:
            extra = self._baseline(list(plan.lengths), seqs, first=False)
        return result, ms, extra

    def _baseline(self, lengths: list[int], seqs: list[Tensor], *, first: bool) -> dict[str, Any]:
        stash = [] if first else [(p, p.grad) for p in self.model.parameters()]
        for p, _ in stash:
            p.grad = None
        plan = self.plan_baseline(lengths)
        res, ms = self.run(plan, seqs)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in stash:
            p.grad = g
        return {
            "baseline_mode": self.method,
            "baseline_exec_ms": ms,
            "baseline_loss": float(res.loss),
            "baseline_estimated_ms": plan.estimated_time_ms,
            "baseline_micro_batches": plan.num_micro_batches,
            "baseline_first": first,
        }
