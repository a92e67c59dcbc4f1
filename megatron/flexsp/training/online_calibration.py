"""The trainer's side of online cost-model calibration: measurements in, a refitted model to the planner out.

Why: the planner (``planner.calibration.CostCalibrator``, torch-free) refits the cost model from
per-group samples, but the samples are spread over the ranks: every rank times its own share of
every micro-batch. Each rank writes its (compute ms, all-to-all ms, peak MB) per micro-batch into
its own slot of a vector that rides the step's existing MAX all-reduce (zeros elsewhere, so the
MAX is a gather); rank 0 then turns the slots into one sample per SP group (the group's slowest
rank, as the cost model's group time is), refits, and hands the model to the planner hook.

The vector has ``3 * micro_batches * world_size`` entries; where that would be large (thousands
of ranks), samples are gathered only every ``interval`` iterations.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from megatron.flexsp.planner.calibration import CostCalibrator, GroupSample
from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.plan import Plan
from megatron.flexsp.planner.tensor_parallel import unit_gpu_ranks, unit_size
from megatron.flexsp.runtime.executor import StepResult

__all__ = ["OnlineCalibration", "SLOTS_PER_RANK"]

log = logging.getLogger("flexsp.train")

SLOTS_PER_RANK = 3  # compute ms, all-to-all ms, peak MB (0: not measured)
_MAX_FLOATS_PER_STEP = 1 << 16


class OnlineCalibration:
    """Per-step sample gathering and refits (rank 0 holds the calibrator; the others only send)."""

    def __init__(self, cost: CostModel, *, enabled: bool, rank: int, world_size: int) -> None:
        self.enabled = enabled
        self.rank, self.world_size = rank, world_size
        self.calibrator = CostCalibrator(cost) if enabled and rank == 0 else None
        self._logged_apply = False

    # ---------------------------------------------------------------- gather
    def interval(self, micro_batches: int) -> int:
        """Gather every this many iterations, so one step never all-reduces more than ~64K floats for it."""
        return max(1, math.ceil(SLOTS_PER_RANK * micro_batches * self.world_size / _MAX_FLOATS_PER_STEP))

    def wants(self, iteration: int, plan: Plan) -> bool:
        return self.enabled and iteration % self.interval(plan.num_micro_batches) == 0

    def local_slots(self, plan: Plan, result: StepResult) -> list[float]:
        """This rank's measurements in its own slots of the gather vector (zeros elsewhere)."""
        w, out = self.world_size, [0.0] * (SLOTS_PER_RANK * plan.num_micro_batches * self.world_size)
        for r in result.micro_batch_stats:
            if r.get("empty_group"):
                continue
            base = SLOTS_PER_RANK * (r["micro_batch"] * w + self.rank)
            a2a = float(r.get("a2a_ms", 0.0))
            out[base] = max(0.0, float(r["fwd_ms"]) + float(r["bwd_ms"]) - a2a)
            out[base + 1] = max(0.0, a2a)
            out[base + 2] = float(r.get("peak_mb") or 0.0)
        return out

    def samples(self, plan: Plan, gathered: list[float]) -> list[GroupSample]:
        """One sample per non-empty group (rank 0, after the gather): compute of its slowest rank, all-to-all
        of its fastest. Why the fastest: a rank that reaches an all-to-all first waits there for the others,
        so its all-to-all time holds the skew of their compute, which the slowest rank's compute already
        counts; the last to arrive waits least, and its time is the transfer. (Taking both maxima counted
        the skew twice and, on 4 ranks sharing 2 cores, refit degree 2 at a tenth of the profiled bandwidth.)"""
        w, out = self.world_size, []
        for m, mb in enumerate(plan.micro_batches):
            for g in mb.groups:
                if not g.sequences:
                    continue
                ranks = unit_gpu_ranks(g.ranks, plan.tensor_parallel_size)  # a TP plan's groups hold units (C6)
                slots = [SLOTS_PER_RANK * (m * w + r) for r in ranks]
                lengths = [plan.lengths[i] for i in g.sequences]
                peak = max(gathered[s + 2] for s in slots)
                out.append(
                    GroupSample(
                        degree=g.degree,
                        tokens=sum(lengths),
                        sum_sq=float(sum(x * x for x in lengths)),
                        compute_ms=max(gathered[s] for s in slots),
                        a2a_ms=min(gathered[s + 1] for s in slots) if g.degree > 1 else 0.0,
                        peak_mb=peak if peak > 0 else None,
                        mode=g.recompute,  # a recomputing group refits its mode's factor
                    )
                )
        return out

    # ----------------------------------------------------------------- refit
    def ingest(self, plan: Plan, gathered: list[float]) -> CostModel | None:
        """Add this step's samples and refit; the new model when calibration applies (rank 0), else None."""
        if self.calibrator is None:
            return None
        self.calibrator.extend(self.samples(plan, gathered))
        new = self.calibrator.refit()
        applied = new.to_dict().get("calibration", {})
        if not (applied.get("compute_applied") or applied.get("bandwidth_applied") or applied.get("recompute_applied")):
            return None
        if not self._logged_apply:
            c = new.compute
            log.info(
                "cost model calibrated from %d measured groups: alpha1 %.4g, alpha2 %.4g, beta1 %.4g ms; bandwidth %s",
                self.calibrator.num_samples,
                c.alpha1_ms_per_token2,
                c.alpha2_ms_per_token,
                c.beta1_ms,
                {int(k): round(v, 4) for k, v in new.alltoall.bandwidth_gbs.items()},
            )
            self._logged_apply = True
        return new

    @property
    def current(self) -> CostModel | None:
        return None if self.calibrator is None else self.calibrator.current

    def coefficients(self) -> dict[str, Any]:
        """The coefficients in force, for the metrics record (rank 0)."""
        if self.calibrator is None:
            return {}
        c = self.calibrator.current
        return {
            "cost_alpha1": c.compute.alpha1_ms_per_token2,
            "cost_alpha2": c.compute.alpha2_ms_per_token,
            "cost_beta1": c.compute.beta1_ms,
            "cost_bandwidth_gbs": {str(k): v for k, v in sorted(c.alltoall.bandwidth_gbs.items())},
        }

    def save(self, path: str) -> None:
        """Write the model in force as a cost-model JSON (what --flexsp-cost-model and flexsp-plan read)."""
        if self.calibrator is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.calibrator.current.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any] | None:
        return None if self.calibrator is None else self.calibrator.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> CostModel | None:
        """Restore the calibration (rank 0); the model in force, for the planner.

        A calibration made at another TP size is not restored: it fitted a cost model over units of
        that size (compute / t, TP all-reduces), which would make this run plan over the wrong units."""
        if self.calibrator is None or not state:
            return None
        saved, now = unit_size(CostModel.from_dict(state["base"])), unit_size(self.calibrator.base)
        if saved != now:
            log.warning(
                "the checkpoint's cost-model calibration was made at tensor-parallel size %d, this run has %d: "
                "not restored (calibration starts again from this run's cost model)",
                saved,
                now,
            )
            return None
        self.calibrator.load_state_dict(state)
        return self.calibrator.current
