"""What every rank needs the maximum of after a step, carried by one MAX all-reduce.

Why one collective: the slowest rank's compute and all-to-all time, the non-finite verdict, the
exit vote and the calibration samples all follow the same step; one small all-reduce carries
them all. Why named fields: the values travel as one flat tensor, and unpacking it by position
is how a new field silently shifts the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["StepMaxima"]

_SCALARS = ("compute_ms", "a2a_ms", "nonfinite", "exit_by_signal", "exit_by_deadline")


@dataclass
class StepMaxima:
    """This rank's values before ``max_over_ranks``, every rank's maxima after it."""

    compute_ms: float  # forward + backward of the step
    a2a_ms: float  # all-to-all time of the step
    nonfinite: float  # 1.0 where the loss or the gradient norm was not finite (NonFiniteGuard.local_flag)
    exit_by_signal: float  # ExitMonitor.votes(): > 0 when the exit signal arrived
    exit_by_deadline: float  # ExitMonitor.votes(): > 0 when the exit duration passed
    calibration: list[float] = field(default_factory=list)  # OnlineCalibration.local_slots (empty: none)

    def max_over_ranks(self, device: torch.device) -> StepMaxima:
        """Every field's maximum over all ranks (collective; on the device for NCCL)."""
        values = [float(getattr(self, name)) for name in _SCALARS] + [float(x) for x in self.calibration]
        t = torch.tensor(values, dtype=torch.float64)
        t = t.to(device) if device.type == "cuda" else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = [float(x) for x in t.tolist()]
        return StepMaxima(*out[: len(_SCALARS)], calibration=out[len(_SCALARS) :])

    @property
    def exit_vote(self) -> tuple[float, float] | None:
        """(signal, deadline) when some rank voted to stop, else None."""
        if self.exit_by_signal > 0 or self.exit_by_deadline > 0:
            return self.exit_by_signal, self.exit_by_deadline
        return None
