"""Online calibration of the recompute modes: each mode's compute factor, and its activation level.

Why a module of its own: ``calibration.CostCalibrator`` refits DESIGN.md's coefficients from the
groups that ran without recomputation; groups that recomputed ran the same model with one more
forward (or part of one), so they measure the *factor* of their mode instead. Given the alphas
and beta1 in force, a group of mode m predicts

    compute_ms = compute_factor_m * (alpha1 * sum s^2 + alpha2 * T) / d + beta1

(beta1 unscaled, ``recompute.py``), so compute_factor_m is a one-coefficient robust fit of
``compute_ms - beta1`` on ``(alpha1 * sum s^2 + alpha2 * T) / d`` over the window's groups of that
mode, with the starting factor as prior (``fitting.robust_nonneg_fit``, same settings as the
alphas). Like mode none's activations, a mode's activation MB per token only ever grows
(``calibration.py``'s rule, per mode). The all-to-all factor is not refitted: the bandwidth fit
uses each group's volume times its mode's factor, so what a mode measures still refits the
bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .costmodel import CostModel
from .fitting import FitError, robust_nonneg_fit

__all__ = ["refit_compute_factors", "mode_volume_factor"]


def mode_volume_factor(cost: CostModel, mode: str) -> float:
    """How many times its mode-none volume a group of ``mode`` sends through all-to-all."""
    return 1.0 if mode == "none" else cost.recompute[mode].alltoall_factor


def refit_compute_factors(
    samples: Sequence[Any],
    base: CostModel,
    alphas: tuple[float, float, float],
    config: Any,
    report: dict[str, Any],
) -> dict[str, float]:
    """{mode: compute_factor} for every recompute mode of ``base``: fitted from the samples of that mode (at
    least ``config.min_samples``; ``CalibrationConfig``), else the starting factor; ``report["recompute"]``
    says which applied."""
    alpha1, alpha2, beta1 = alphas
    min_samples, prior_weight, huber_k = config.min_samples, config.prior_weight, config.huber_k
    out: dict[str, float] = {}
    rep: dict[str, Any] = {}
    for mode, coeffs in base.recompute.items():
        ss = [s for s in samples if s.mode == mode]
        out[mode] = coeffs.compute_factor
        rep[mode] = {"samples": len(ss), "applied": False}
        if len(ss) < min_samples:
            continue
        x = np.array([(alpha1 * s.sum_sq + alpha2 * s.tokens) / s.degree for s in ss])
        y = np.array([s.compute_ms - beta1 for s in ss])
        if not (x > 0).all():
            continue
        try:
            fit = robust_nonneg_fit(
                x[:, None], y, prior=[coeffs.compute_factor], prior_weight=prior_weight, huber_k=huber_k
            )
        except FitError as e:
            rep[mode]["error"] = str(e)
            continue
        if fit.coef[0] > 0:
            out[mode] = float(fit.coef[0])
            rep[mode].update(applied=True, compute_factor=out[mode], rms_rel_err=fit.rms_rel_err)
    report["recompute"] = rep
    return out
