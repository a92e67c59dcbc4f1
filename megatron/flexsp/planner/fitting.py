"""Torch-free least-squares fitters of the cost model's coefficients.

Why here: the profiler (``flexsp-profile``, one-off, in the training layer) and the online
calibration of a running job (``calibration.py``, fed every few iterations) must fit the same
formulas the same way, and the planner layer may not import torch, so the numerical part lives
in the planner package and both callers use it.

* ``fit_compute``: alpha1, alpha2, beta1 >= 0 of ``sum(a1 s^2 + a2 s) + b1 = ms`` on the relative
  error (timings span orders of magnitude, so absolute least squares would fit only the largest).
* ``fit_bandwidth``: the effective bandwidth of the formula ``ms = MB / bw`` (through the origin).
* ``fit_linear``: ordinary least squares of a line (memory against tokens).
* ``robust_nonneg_fit``: the calibration's fitter: non-negative, relative-error, Huber-weighted
  (iteratively reweighted) least squares with a prior pulling each coefficient toward a known
  value with a given weight. Weights use the *current prediction* as the scale, not the noisy
  measurement, so multiplicative noise does not bias the fit downward (weighting by 1/y does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ComputeFit",
    "FitError",
    "LinearFit",
    "RobustFit",
    "fit_bandwidth",
    "fit_compute",
    "fit_linear",
    "robust_nonneg_fit",
]


class FitError(ValueError):
    """The samples cannot determine the coefficients; the message says what to change.

    (The profiler's ``ProfileError`` is this class: ``ProfileError = FitError`` keeps its
    callers' ``except``/``pytest.raises`` working.)
    """


# ------------------------------------------------------------------ profiler fitters


@dataclass
class ComputeFit:
    alpha1_ms_per_token2: float
    alpha2_ms_per_token: float
    beta1_ms: float
    rms_rel_err: float
    max_rel_err: float
    samples: int

    def predict(self, lengths: Sequence[int]) -> float:
        return sum(self.alpha1_ms_per_token2 * s * s + self.alpha2_ms_per_token * s for s in lengths) + self.beta1_ms


def fit_compute(samples: Sequence[tuple[Sequence[int], float]]) -> ComputeFit:
    """alpha1, alpha2, beta1 >= 0 minimising the relative error of sum(a1 s^2 + a2 s) + b1 = ms.

    ``samples``: (sequence lengths of one micro-batch at degree 1, measured ms).
    """
    from scipy.optimize import nnls

    if len(samples) < 3:
        raise FitError(f"compute fit needs at least 3 timings, got {len(samples)}")
    a = np.array([[sum(float(s) ** 2 for s in ls), float(sum(ls)), 1.0] for ls, _ in samples])
    y = np.array([float(ms) for _, ms in samples])
    if np.any(y <= 0) or not np.all(np.isfinite(y)):
        raise FitError(f"compute timings must be positive and finite, got {y.tolist()}")
    if np.linalg.matrix_rank(a) < 3:
        raise FitError(
            "compute fit: the samples do not separate s^2, s and the constant (use at least three different lengths)"
        )
    scale = a.max(axis=0)  # column scaling keeps nnls well conditioned (s^2 is ~1e9 at 32K tokens)
    w = 1.0 / y
    coef, _ = nnls(a / scale * w[:, None], y * w)
    coef = coef / scale
    pred = a @ coef
    rel = (pred - y) / y
    return ComputeFit(
        float(coef[0]),
        float(coef[1]),
        float(coef[2]),
        float(np.sqrt(np.mean(rel**2))),
        float(np.max(np.abs(rel))),
        len(samples),
    )


def fit_bandwidth(samples: Sequence[tuple[float, float]]) -> float:
    """Bandwidth (2^20 bytes per ms, the cost model's 'GB/s') from (MB of the formula, measured ms).

    Least squares through the origin of ms = MB / bw, so large (real-size) messages dominate and a
    fixed latency is spread as the formula (which has none) would need it.
    """
    if not samples:
        raise FitError("all-to-all fit needs at least one timing")
    mb = np.array([float(m) for m, _ in samples])
    ms = np.array([float(t) for _, t in samples])
    if np.any(mb <= 0) or np.any(ms <= 0) or not np.all(np.isfinite(ms)):
        raise FitError(f"all-to-all samples must be positive: MB {mb.tolist()}, ms {ms.tolist()}")
    inv_bw = float(np.dot(mb, ms) / np.dot(mb, mb))
    return 1.0 / inv_bw


@dataclass
class LinearFit:
    slope: float
    intercept: float
    rms_err: float


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Ordinary least squares y = slope * x + intercept (at least two distinct x)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        raise FitError(f"a linear fit needs two distinct points, got x = {x.tolist()}")
    slope, intercept = np.polyfit(x, y, 1)
    err = float(np.sqrt(np.mean((slope * x + intercept - y) ** 2)))
    return LinearFit(float(slope), float(intercept), err)


# ------------------------------------------------------------------ robust fitter


@dataclass
class RobustFit:
    """Coefficients of ``robust_nonneg_fit`` and how well they explain the samples."""

    coef: np.ndarray  # [P], all >= 0
    rel_scale: float  # robust scale (1.4826 * MAD) of the relative residuals
    rms_rel_err: float  # of the samples with full weight (outliers excluded)
    outliers: int  # samples whose Huber weight fell below 0.5
    iterations: int


def _checked_samples(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise FitError(f"robust fit: x must be [N, P] and y [N], got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise FitError("robust fit needs at least one sample")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(y <= 0):
        raise FitError("robust fit: samples must be finite with positive measurements")
    return x, y


def _prior_terms(
    x: np.ndarray, y: np.ndarray, prior: Sequence[float] | None, prior_weight: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """(prior p, its per-coefficient scale m, its weight); without a prior zeros and weight 0."""
    p = x.shape[1]
    if prior is None:
        return np.zeros(p), np.zeros(p), 0.0
    pr = np.asarray(prior, dtype=np.float64)
    if pr.shape != (p,):
        raise FitError(f"robust fit: prior must have {p} values, got {pr.shape}")
    return pr, (x / y[:, None]).mean(axis=0), prior_weight


def _quality(x: np.ndarray, y: np.ndarray, coef: np.ndarray, h: np.ndarray) -> tuple[float, int]:
    """RMS relative residual of the fully weighted samples, and how many were down-weighted."""
    pred = x @ coef
    r = (pred - y) / np.where(pred > 0, pred, y)
    full = h >= 0.5
    rms = float(np.sqrt(np.mean(r[full] ** 2))) if full.any() else float("nan")
    return rms, int((~full).sum())


def robust_nonneg_fit(
    x: np.ndarray,
    y: np.ndarray,
    *,
    prior: Sequence[float] | None = None,
    prior_weight: float = 0.0,
    huber_k: float = 1.345,
    iters: int = 20,
    min_scale: float = 0.01,
) -> RobustFit:
    """Non-negative c minimising sum_i h_i ((x_i . c - y_i) / yhat_i)^2 + prior_weight * sum_j (m_j (c_j - p_j))^2.

    * relative residuals, scaled by the previous iteration's prediction ``yhat`` (unbiased under
      multiplicative noise; the first iteration uses the median of y);
    * Huber weights h_i = min(1, k * sigma / |r_i|), sigma the MAD scale of the residuals
      (floored at ``min_scale``), so a few measurements taken while the machine was busy pull
      the fit linearly, not quadratically;
    * the prior acts like ``prior_weight`` typical samples: its residual for coefficient j is the
      relative change ``m_j (c_j - p_j)`` that the deviation makes to a sample's prediction on
      average (m_j = mean_i x_ij / y_i). Scaling by the data, not by p_j, keeps a prior that is far
      too small from pulling harder than one that is too large. With many samples the data win;
      with few, the prior keeps the model sane.
    """
    from scipy.optimize import lsq_linear

    x, y = _checked_samples(x, y)
    n, p = x.shape
    ymed = float(np.median(y))
    pr, m, prior_weight = _prior_terms(x, y, prior, prior_weight)
    # column scaling: s^2 terms are ~1e9 times the constant's
    cs = np.maximum(np.abs(x).max(axis=0), 1e-300)
    yhat = np.full(n, ymed)
    h = np.ones(n)
    coef = np.maximum(pr, 0.0) if prior is not None else np.zeros(p)
    sigma = min_scale
    done_iters = 0
    for _ in range(iters):
        done_iters += 1
        w = np.sqrt(h) / yhat
        A = x / cs * w[:, None]
        b = y * w
        if prior_weight > 0:
            sw = np.sqrt(prior_weight)
            A = np.vstack([A, np.diag(sw * m / cs)])
            b = np.concatenate([b, sw * m * pr])
        res = lsq_linear(A, b, bounds=(0.0, np.inf), method="bvls")
        new = res.x / cs
        pred = x @ new
        # a coefficient vector predicting <= 0 somewhere: keep the scale from the data instead
        yhat = np.where(pred > 1e-12 * ymed, pred, y)
        r = (pred - y) / yhat
        sigma = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), min_scale)
        h = np.minimum(1.0, huber_k * sigma / np.maximum(np.abs(r), 1e-300))
        done = np.allclose(new, coef, rtol=1e-6, atol=0.0)
        coef = new
        if done:
            break
    rms, down = _quality(x, y, coef, h)
    return RobustFit(coef, sigma, rms, down, done_iters)
