"""Argument types and value tables the flag modules share (``flags``, ``flags_flexsp``).

Why its own module: both flag modules parse numbers the same way, and the parser builder imports
both, so the shared pieces cannot live in either.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["ATTN_ALIASES", "nonneg_float", "nonneg_int", "positive_float", "positive_int", "time_limit"]

# Megatron's --attention-backend names map onto the FlexSP attention backends.
ATTN_ALIASES = {
    "auto": "auto",
    "sdpa": "sdpa",
    "flash": "flash",
    "te": "te",
    "fused": "te",
    "unfused": "sdpa",
    "local": "sdpa",
}


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def time_limit(s: str) -> float | None:
    """'auto' (None: set from the measured iteration time) or seconds > 0."""
    return None if s == "auto" else positive_float(s)
