"""Online calibration of the cost model from what the executor measures while training.

Why: a cost model profiled once drifts (other jobs on the network, a new kernel, a different
model size), and one profiled on a busy machine is noise; the planner optimises against
whatever it is given. The executor already times every SP group of every micro-batch, so those
timings refit the coefficients as the run goes, and later plans use the refitted model.

What is fitted (DESIGN.md's formulas, nothing more, so the result is an ordinary cost-model JSON):

* compute: ``compute_ms = (alpha1 * sum s^2 + alpha2 * T) / d + beta1`` over all groups of the
  window, by ``fitting.robust_nonneg_fit`` (relative error, Huber-weighted, non-negative, the
  starting model as a prior worth ``prior_weight`` samples);
* all-to-all, per degree d >= 2: ``a2a_ms = MB / bw_d`` with MB = bytes_per_token * T / d / 2^20
  (the formula's volume, so the fitted bandwidth is the *effective* one the formula needs, as the
  profiler's is), same robust fitter, the starting bandwidth as prior;
* memory: ``activation_mb_per_token`` only ever grows: a sample whose peak exceeds
  model_states_mb + act * tokens_per_rank raises it to fit that sample (times ``memory_margin``);
  samples holding less than ``memory_min_fill`` of a GPU's token capacity are not used, since
  fixed workspaces would dominate them and inflate the per-token slope where it does not bind.
* recompute modes: groups that recomputed refit their mode's compute factor and (only up) its
  activations instead of the alphas (``calibration_modes``).

A refit applies only once ``min_samples`` compute samples (``min_degree_samples`` per degree
for bandwidth) are in the window; before that the starting coefficients stay. Samples live in
a rolling window (the most recent ``window``), so the model follows drift. ``state_dict`` holds
everything (config, starting model, window, memory level, model in force) as plain JSON, so a
resumed run continues with the identical calibrated model and the identical future refits.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .calibration_modes import mode_volume_factor, refit_compute_factors
from .costmodel import CostModel
from .fitting import FitError, robust_nonneg_fit
from .plan import Plan, PlanError

__all__ = ["CalibrationConfig", "CostCalibrator", "GroupSample", "coefficients", "samples_from_plan"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class GroupSample:
    """One SP group of one micro-batch, as measured by the executor.

    ``a2a_bytes``: bytes one rank of the group sent through all-to-all (forward and backward);
    used only as a diagnostic (measured volume / formula volume). ``peak_mb``: peak memory of a
    rank of the group during the micro-batch; ``tokens_per_rank``: the most tokens one rank held
    (default ceil(tokens / degree)); ``mode``: the group's recompute mode.
    """

    degree: int
    tokens: int
    sum_sq: float
    compute_ms: float
    a2a_ms: float = 0.0
    a2a_bytes: float = 0.0
    peak_mb: float | None = None
    tokens_per_rank: float | None = None
    mode: str = "none"

    def to_list(self) -> list:
        return [
            self.degree,
            self.tokens,
            self.sum_sq,
            self.compute_ms,
            self.a2a_ms,
            self.a2a_bytes,
            self.peak_mb,
            self.tokens_per_rank,
            self.mode,
        ]

    @classmethod
    def from_list(cls, v: list) -> GroupSample:
        return cls(
            int(v[0]),
            int(v[1]),
            float(v[2]),
            float(v[3]),
            float(v[4]),
            float(v[5]),
            None if v[6] is None else float(v[6]),
            None if v[7] is None else float(v[7]),
            str(v[8]) if len(v) > 8 else "none",  # states saved before recompute modes: none
        )


@dataclass
class CalibrationConfig:
    window: int = 1024  # most recent samples kept and fitted
    min_samples: int = 24  # compute samples in the window before compute coefficients change
    min_degree_samples: int = 6  # all-to-all samples of a degree before its bandwidth changes
    prior_weight: float = 3.0  # the starting model counts as this many samples
    huber_k: float = 1.345
    memory_min_fill: float = 0.25  # memory samples below this share of a GPU's token capacity are ignored
    memory_margin: float = 1.0  # raise activation_mb_per_token to margin * (what the sample needs)

    def __post_init__(self) -> None:
        if self.window < 3 or self.min_samples < 3 or self.min_degree_samples < 1:
            raise ValueError(f"calibration: need window >= 3, min_samples >= 3, min_degree_samples >= 1; got {self}")
        if self.prior_weight < 0 or self.huber_k <= 0 or self.memory_margin < 1.0:
            raise ValueError(f"calibration: need prior_weight >= 0, huber_k > 0, memory_margin >= 1; got {self}")


class CostCalibrator:
    """Refits a cost model from per-group measurements; see the module docstring.

    Typical use (trainer, rank 0, every few iterations)::

        cal = CostCalibrator(cost)
        cal.extend(samples)            # GroupSample per group per micro-batch
        cost = cal.refit()             # the model later plans use
        ckpt["flexsp_calibration"] = cal.state_dict()
    """

    def __init__(self, base: CostModel, config: CalibrationConfig | None = None):
        self.base = base
        self.config = config or CalibrationConfig()
        self._samples: deque[GroupSample] = deque(maxlen=self.config.window)
        self._act = float(base.memory.activation_mb_per_token)
        self._acts = {m: c.activation_mb_per_token for m, c in base.recompute.items()}  # per mode, only grow
        self._seen = 0
        self._rejected = 0
        self._current = base
        self._report: dict[str, Any] = {}

    # ------------------------------------------------------------------ input
    def add(
        self,
        degree: int,
        tokens: int,
        sum_sq: float,
        compute_ms: float,
        a2a_ms: float = 0.0,
        a2a_bytes: float = 0.0,
        peak_mb: float | None = None,
        tokens_per_rank: float | None = None,
        mode: str = "none",
    ) -> None:
        """Record one group of one micro-batch (see ``GroupSample``)."""
        self.add_sample(
            GroupSample(
                int(degree),
                int(tokens),
                float(sum_sq),
                float(compute_ms),
                float(a2a_ms),
                float(a2a_bytes),
                None if peak_mb is None else float(peak_mb),
                None if tokens_per_rank is None else float(tokens_per_rank),
                mode,
            )
        )

    def add_sample(self, s: GroupSample) -> None:
        vals = [s.sum_sq, s.compute_ms, s.a2a_ms, s.a2a_bytes]
        if (
            s.degree < 1
            or s.tokens < 1
            or not all(math.isfinite(v) for v in vals)
            or s.compute_ms <= 0
            or s.sum_sq < s.tokens
            or s.mode not in self.base.modes  # a mode the model has no coefficients for
        ):
            self._rejected += 1  # empty group, failed timer or inconsistent lengths: not evidence
            return
        self._samples.append(s)
        self._seen += 1
        self._raise_memory(s)

    def extend(self, samples: Iterable[GroupSample]) -> None:
        for s in samples:
            self.add_sample(s)

    def _raise_memory(self, s: GroupSample) -> None:
        if s.peak_mb is None or not math.isfinite(s.peak_mb):
            return
        tpr = s.tokens_per_rank if s.tokens_per_rank is not None else math.ceil(s.tokens / s.degree)
        mem = self.base.memory
        act = self._act if s.mode == "none" else self._acts[s.mode]
        tokens_per_gpu = (mem.limit_gb * 1024 - mem.model_states_mb) / act
        if tpr <= 0 or tpr < self.config.memory_min_fill * tokens_per_gpu:
            return
        need = (s.peak_mb - mem.model_states_mb) / tpr * self.config.memory_margin
        if need > act and s.mode == "none":
            self._act = float(need)
        elif need > act:
            self._acts[s.mode] = float(need)

    # ----------------------------------------------------------------- output
    @property
    def num_samples(self) -> int:
        """Samples in the window now."""
        return len(self._samples)

    @property
    def current(self) -> CostModel:
        """The model in force (the last ``refit``'s, or the starting model)."""
        return self._current

    @property
    def report(self) -> dict[str, Any]:
        """What the last refit did (samples used, fit errors, outliers, which parts applied)."""
        return dict(self._report)

    def _refit_compute(self, comp: list[GroupSample], report: dict[str, Any]) -> tuple[float, float, float]:
        """(alpha1, alpha2, beta1) fitted from the window, or the base model's where samples are too few."""
        cfg = self.config
        c0 = self.base.compute  # prior: the starting model, not the last fit (no drift by feedback)
        alpha1, alpha2, beta1 = c0.alpha1_ms_per_token2, c0.alpha2_ms_per_token, c0.beta1_ms
        if len(comp) < cfg.min_samples:
            report["compute"] = {"applied": False, "need": cfg.min_samples}
            return alpha1, alpha2, beta1
        d = np.array([s.degree for s in comp], dtype=np.float64)
        x = np.stack(
            [np.array([s.sum_sq for s in comp]) / d, np.array([s.tokens for s in comp]) / d, np.ones(len(comp))],
            axis=1,
        )
        y = np.array([s.compute_ms for s in comp])
        try:
            fit = robust_nonneg_fit(
                x, y, prior=[alpha1, alpha2, beta1], prior_weight=cfg.prior_weight, huber_k=cfg.huber_k
            )
            alpha1, alpha2, beta1 = (float(v) for v in fit.coef)
            report["compute"] = {
                "applied": True,
                "rms_rel_err": fit.rms_rel_err,
                "rel_scale": fit.rel_scale,
                "outliers": fit.outliers,
            }
        except FitError as e:
            report["compute"] = {"applied": False, "error": str(e)}
        return alpha1, alpha2, beta1

    def _refit_degree(self, deg: int, ss: list[GroupSample], bpt: float, bw: dict[int, float]) -> dict[str, Any]:
        """Fit degree ``deg``'s bandwidth from its samples (into ``bw``); the report of that degree."""
        cfg = self.config
        rep: dict[str, Any] = {"samples": len(ss)}
        mb = np.array([bpt * s.tokens / deg / 2**20 for s in ss])
        with_bytes = [(s.a2a_bytes, m) for s, m in zip(ss, mb) if s.a2a_bytes > 0]
        if with_bytes:
            rep["bytes_ratio"] = float(np.median([b / 2**20 / m for b, m in with_bytes]))
        rep["applied"] = False
        if len(ss) >= cfg.min_degree_samples:
            y = np.array([s.a2a_ms for s in ss])
            prior = [1.0 / bw[deg]] if deg in bw else None
            fit = robust_nonneg_fit(
                mb[:, None], y, prior=prior, prior_weight=cfg.prior_weight if prior else 0.0, huber_k=cfg.huber_k
            )
            if fit.coef[0] > 0:
                bw[deg] = float(1.0 / fit.coef[0])
                rep.update(applied=True, bandwidth_gbs=bw[deg], rms_rel_err=fit.rms_rel_err, outliers=fit.outliers)
        return rep

    def _refit_alltoall(self, comp: list[GroupSample], report: dict[str, Any]) -> dict[int, float]:
        """Bandwidth per degree: fitted where a degree has enough samples, else the base model's."""
        bpt = self.base.alltoall.bytes_per_token
        bw = dict(self.base.alltoall.bandwidth_gbs)
        report["alltoall"] = {}
        by_deg: dict[int, list[GroupSample]] = {}
        for s in comp:
            if s.degree >= 2 and s.a2a_ms > 0:
                f = mode_volume_factor(self.base, s.mode)  # a recomputing group sends its volume f times
                s = (
                    s
                    if f == 1.0
                    else GroupSample(s.degree, s.tokens, s.sum_sq, s.compute_ms, s.a2a_ms / f, s.a2a_bytes / f)
                )
                by_deg.setdefault(s.degree, []).append(s)
        for deg in sorted(by_deg):
            report["alltoall"][str(deg)] = self._refit_degree(deg, by_deg[deg], bpt, bw)
        return bw

    def refit(self) -> CostModel:
        """Refit from the window; the new model is also ``current``. Parts without enough samples keep their values."""
        base = self.base
        comp = list(self._samples)
        report: dict[str, Any] = {"samples": len(comp), "seen": self._seen, "rejected": self._rejected}
        alpha1, alpha2, beta1 = self._refit_compute([s for s in comp if s.mode == "none"], report)
        factors = refit_compute_factors(comp, base, (alpha1, alpha2, beta1), self.config, report)
        bpt = base.alltoall.bytes_per_token
        bw = self._refit_alltoall(comp, report)
        report["activation_mb_per_token"] = self._act
        d = base.to_dict()
        d["compute"] = {"alpha1_ms_per_token2": alpha1, "alpha2_ms_per_token": alpha2, "beta1_ms": beta1}
        d["alltoall"] = {"bytes_per_token": bpt, "bandwidth_gbs": {str(k): v for k, v in sorted(bw.items())}}
        d["memory"] = dict(d["memory"], activation_mb_per_token=self._act)
        for m in base.recompute:
            d["recompute"][m].update(compute_factor=factors[m], activation_mb_per_token=self._acts[m])
        d["calibration"] = {
            "samples": len(comp),
            "seen": self._seen,
            "compute_applied": bool(report["compute"].get("applied")),
            "bandwidth_applied": sorted(int(k) for k, r in report["alltoall"].items() if r["applied"]),
            "recompute_applied": sorted(m for m, r in report["recompute"].items() if r["applied"]),
        }
        self._current = CostModel.from_dict(d)
        self._report = report
        return self._current

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state: a resumed run continues with the identical model and future refits."""
        return {
            "version": _STATE_VERSION,
            "config": asdict(self.config),
            "base": self.base.to_dict(),
            "samples": [s.to_list() for s in self._samples],
            "activation_mb_per_token": self._act,
            "activation_mb_per_token_modes": dict(self._acts),
            "seen": self._seen,
            "rejected": self._rejected,
            "current": self._current.to_dict(),
            "report": self._report,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"calibration state version {state.get('version')!r} is not {_STATE_VERSION}")
        known = {f.name for f in fields(CalibrationConfig)}
        self.config = CalibrationConfig(**{k: v for k, v in state["config"].items() if k in known})
        self.base = CostModel.from_dict(state["base"])
        self._samples = deque((GroupSample.from_list(v) for v in state["samples"]), maxlen=self.config.window)
        self._act = float(state["activation_mb_per_token"])
        acts = state.get("activation_mb_per_token_modes", {})
        self._acts = {m: float(acts.get(m, c.activation_mb_per_token)) for m, c in self.base.recompute.items()}
        self._seen = int(state["seen"])
        self._rejected = int(state.get("rejected", 0))
        self._current = CostModel.from_dict(state["current"])
        self._report = dict(state.get("report", {}))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CostCalibrator:
        cal = cls(CostModel.from_dict(state["base"]))
        cal.load_state_dict(state)
        return cal


def samples_from_plan(plan: Plan, measured: Sequence[Sequence[Mapping[str, float] | None]]) -> list[GroupSample]:
    """GroupSamples of one executed plan: degree, tokens and sum of squares from the plan, times from ``measured``.

    ``measured[m][g]`` belongs to ``plan.micro_batches[m].groups[g]`` and has ``compute_ms`` and
    optionally ``a2a_ms``, ``a2a_bytes``, ``peak_mb`` (None for a group that was not measured).
    Empty groups are skipped; tokens per rank is the packed share ceil(T / d).
    """
    if len(measured) != len(plan.micro_batches):
        raise PlanError(f"measurements for {len(measured)} micro-batches, the plan has {len(plan.micro_batches)}")
    out = []
    for m, (mb, meas) in enumerate(zip(plan.micro_batches, measured)):
        if len(meas) != len(mb.groups):
            raise PlanError(f"micro-batch {m}: measurements for {len(meas)} groups, the plan has {len(mb.groups)}")
        for g, x in zip(mb.groups, meas):
            if x is None or not g.sequences:
                continue
            lens = [plan.lengths[s] for s in g.sequences]
            T = sum(lens)
            peak = x.get("peak_mb")
            out.append(
                GroupSample(
                    g.degree,
                    T,
                    float(sum(s * s for s in lens)),
                    float(x["compute_ms"]),
                    float(x.get("a2a_ms", 0.0)),
                    float(x.get("a2a_bytes", 0.0)),
                    None if peak is None else float(peak),
                    float(math.ceil(T / g.degree)),
                    g.recompute,
                )
            )
    return out


def coefficients(cost: CostModel) -> dict[str, float]:
    """The coefficients in force as one flat JSON-able dict (for a metrics record)."""
    c, m = cost.compute, cost.memory
    out = {
        "alpha1_ms_per_token2": c.alpha1_ms_per_token2,
        "alpha2_ms_per_token": c.alpha2_ms_per_token,
        "beta1_ms": c.beta1_ms,
        "activation_mb_per_token": m.activation_mb_per_token,
    }
    out.update({f"bandwidth_gbs_{d}": bw for d, bw in cost.alltoall.bandwidth_gbs.items()})
    return out
