"""Synthetic long-tailed sequence lengths for tests and benchmarks (torch-free).

Real pre-training corpora (web pages, Wikipedia, code, books) have document lengths with a
log-normal body and a heavy, roughly power-law tail. FlexSP's gains come from that tail, so
the generator models both parts explicitly:

* body (a fraction ``1 - tail_frac``): log-normal with the given ``median`` and ``sigma``
  (the standard deviation of ln(length)); with the defaults (median 768, sigma 1.1) about
  77% of all sequences (body and tail together) are under 2K tokens, the mean about 2.1K (max_len 192K);
* tail (a fraction ``tail_frac``): Pareto with scale ``tail_min`` and shape ``pareto_alpha``,
  P(L > x) = (tail_min / x) ** pareto_alpha for x >= tail_min (smaller alpha, heavier tail):
  with the defaults (5% tail from 4K, alpha 1.2) about 1 in 500 sequences is longer than 64K
  and 1 in 1700 reaches a 192K ``max_len`` (about one such sequence in every 3 batches of 512).

Every length is rounded and clipped to [min_len, max_len]; min_len defaults to min(32, max_len).
"""

from __future__ import annotations

import numpy as np

__all__ = ["longtail_lengths"]


def longtail_lengths(
    n: int,
    *,
    max_len: int,
    median: float = 768.0,
    sigma: float = 1.1,
    tail_frac: float = 0.05,
    pareto_alpha: float = 1.2,
    tail_min: float = 4096.0,
    min_len: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``n`` lengths (int64) from a log-normal body plus a Pareto tail, clipped to [min_len, max_len]."""
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"longtail_lengths: n must be a non-negative integer, got {n!r}")
    if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
        raise ValueError(f"longtail_lengths: max_len must be a positive integer, got {max_len!r}")
    if min_len is None:
        min_len = min(32, int(max_len))
    if not 1 <= min_len <= max_len:
        raise ValueError(f"longtail_lengths: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if median <= 0 or sigma < 0:
        raise ValueError(f"longtail_lengths: need median > 0 and sigma >= 0, got median={median}, sigma={sigma}")
    if not 0.0 <= tail_frac <= 1.0:
        raise ValueError(f"longtail_lengths: tail_frac must be in [0, 1], got {tail_frac}")
    if pareto_alpha <= 0 or tail_min <= 0:
        raise ValueError(f"longtail_lengths: need pareto_alpha > 0 and tail_min > 0, got {pareto_alpha}, {tail_min}")
    rng = np.random.default_rng(seed)
    n = int(n)
    in_tail = rng.random(n) < tail_frac
    body = rng.lognormal(mean=np.log(median), sigma=sigma, size=n)
    # Inverse-CDF sampling of the Pareto: x = tail_min * U^(-1/alpha), U in (0, 1].
    u = 1.0 - rng.random(n)
    tail = tail_min * u ** (-1.0 / pareto_alpha)
    out = np.where(in_tail, tail, body)
    return np.clip(np.rint(np.minimum(out, float(max_len))), min_len, max_len).astype(np.int64)
