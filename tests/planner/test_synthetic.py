"""Synthetic long-tail lengths: range, determinism, and the documented distribution shape."""

import math

import numpy as np
import pytest

from megatron.flexsp.data.synthetic import longtail_lengths


def test_range_dtype_and_determinism():
    a = longtail_lengths(5000, max_len=196608, seed=3)
    b = longtail_lengths(5000, max_len=196608, seed=3)
    c = longtail_lengths(5000, max_len=196608, seed=4)
    assert a.dtype == np.int64 and a.shape == (5000,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 32 and a.max() <= 196608


def test_body_median_matches_lognormal_and_tail_fraction_matches_pareto():
    n = 200_000
    body = longtail_lengths(n, max_len=10**9, median=1000, sigma=0.5, tail_frac=0.0, min_len=1, seed=0)
    assert abs(np.median(body) / 1000 - 1) < 0.02
    # sigma is the std of ln(L)
    assert abs(np.std(np.log(body)) - 0.5) < 0.02
    tail = longtail_lengths(n, max_len=10**12, tail_frac=1.0, tail_min=4096, pareto_alpha=0.8, min_len=1, seed=1)
    assert tail.min() >= 4096
    # P(L > x) = (x_m / x)^alpha
    for x in (8192, 65536):
        assert abs((tail > x).mean() - (4096 / x) ** 0.8) < 0.01


def test_defaults_give_mostly_short_with_tail_to_max():
    x = longtail_lengths(20000, max_len=196608, seed=0)
    assert (x < 2048).mean() > 0.7
    assert (x == 196608).sum() > 0  # the tail reaches the max length


def test_small_max_len_and_bad_arguments():
    x = longtail_lengths(100, max_len=8, seed=0)
    assert x.min() >= 1 and x.max() <= 8
    with pytest.raises(ValueError, match="tail_frac"):
        longtail_lengths(10, max_len=100, tail_frac=1.5)
    with pytest.raises(ValueError, match="min_len"):
        longtail_lengths(10, max_len=100, min_len=200)
    with pytest.raises(ValueError, match="max_len"):
        longtail_lengths(10, max_len=0)
    with pytest.raises(ValueError, match="n must be"):
        longtail_lengths(-1, max_len=100)
    assert not math.isnan(longtail_lengths(0, max_len=10).sum())
