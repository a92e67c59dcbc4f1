"""Activation recomputation in the cost model: per-mode coefficients of the optional ``"recompute"`` key.

Why a module of its own: the cost model (``costmodel.py``) reads and writes this key, the prior
(``prior.py``) derives it from the model shape, the calibration refits it, and the planner's
configuration names the modes; all of them share the names and the validation here, and this
module imports nothing of the planner, so each can read it.

JSON form (additive; a file without the key plans exactly as before, the top-level
``memory.activation_mb_per_token`` is mode "none")::

    "recompute": {"selective": {"activation_mb_per_token": 2.9, "compute_factor": 1.03, "alltoall_factor": 1.0},
                  "full":      {"activation_mb_per_token": 0.27, "compute_factor": 1.33, "alltoall_factor": 1.5}}

A group of degree d that holds T tokens under mode m needs ``model_states_mb + act_m * T / d``
MB per GPU; its compute (the token-dependent f+b work, alpha terms) is multiplied by
``compute_factor`` and its all-to-all time by ``alltoall_factor`` (full recompute runs the
forward, and so the attention's forward all-to-all, once more in backward). beta1, the
per-micro-batch fixed cost (ZeRO-3 parameter gathers, launches), is not multiplied: the
recompute runs inside a layer's backward while that layer's parameters are gathered anyway.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "MODES",
    "RECOMPUTE_CHOICES",
    "CostModelError",
    "RecomputeCoeffs",
    "RecomputeModes",
    "parse_recompute",
    "recompute_to_dict",
    "check_choice",
]

MODES = ("none", "selective", "full")  # what a plan group may record
RECOMPUTE_CHOICES = MODES + ("auto",)  # what a user may ask the planner for
_FIELDS = ("activation_mb_per_token", "compute_factor", "alltoall_factor")


class CostModelError(ValueError):
    """A cost model that cannot be used, with the offending field named (re-exported by ``costmodel``)."""


@dataclass(frozen=True)
class RecomputeCoeffs:
    """One mode's activation memory per token (MB) and its time factors (see module docstring)."""

    activation_mb_per_token: float
    compute_factor: float
    alltoall_factor: float
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown keys of the entry, kept on save


def check_choice(recompute: str, *, allow_auto: bool = True) -> str:
    """``recompute`` if it names a mode (or "auto"); ValueError naming the choices otherwise."""
    choices = RECOMPUTE_CHOICES if allow_auto else MODES
    if recompute not in choices:
        raise ValueError(f"recompute must be one of {', '.join(choices)}; got {recompute!r}")
    return recompute


def _positive(entry: Mapping[str, Any], key: str, where: str) -> float:
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CostModelError(f"cost model: field '{where}.{key}' must be a finite number > 0, got {v!r}")
    return float(v)


def parse_recompute(raw: Any) -> dict[str, RecomputeCoeffs]:
    """The ``"recompute"`` key as {mode: coefficients}; CostModelError names a bad field."""
    if not isinstance(raw, Mapping):
        raise CostModelError(
            f"cost model: 'recompute' must be an object {{mode: coefficients}}, got {type(raw).__name__}"
        )
    out: dict[str, RecomputeCoeffs] = {}
    for mode, entry in raw.items():
        if mode not in MODES[1:]:
            raise CostModelError(f"cost model: 'recompute.{mode}' is not a recompute mode (expected selective or full)")
        where = f"recompute.{mode}"
        if not isinstance(entry, Mapping):
            raise CostModelError(f"cost model: '{where}' must be an object, got {type(entry).__name__}")
        for k in _FIELDS:
            if k not in entry:
                raise CostModelError(f"cost model: missing field '{where}.{k}'")
        vals = {k: _positive(entry, k, where) for k in _FIELDS}
        extra = {k: v for k, v in entry.items() if k not in _FIELDS}
        out[mode] = RecomputeCoeffs(**vals, extra=extra)
    return {m: out[m] for m in MODES[1:] if m in out}


def recompute_to_dict(modes: Mapping[str, RecomputeCoeffs]) -> dict[str, dict[str, Any]]:
    """The JSON form of ``parse_recompute``'s result (round trip)."""
    return {
        m: {
            "activation_mb_per_token": c.activation_mb_per_token,
            "compute_factor": c.compute_factor,
            "alltoall_factor": c.alltoall_factor,
            **dict(c.extra),
        }
        for m, c in modes.items()
    }


class RecomputeModes:
    """Recompute-mode views of a ``CostModel`` (mixed in; it has ``recompute``, ``compute``, ``alltoall``,
    ``memory``, ``fits`` and ``group_time_ms``). Lives here so that costmodel.py stays one screenful of
    DESIGN.md's formulas."""

    recompute: Mapping[str, RecomputeCoeffs]
    name: str

    @property
    def modes(self) -> tuple[str, ...]:
        """Recompute modes this model has coefficients for: "none" and those of its ``recompute`` key."""
        return ("none",) + tuple(m for m in MODES[1:] if m in self.recompute)

    @functools.cached_property
    def _mode_views(self) -> dict[str, Any]:
        return {}

    def for_mode(self, mode: str) -> Any:
        """The plain model (no ``recompute`` key) whose DESIGN.md formulas are mode ``mode``'s (recompute.py):
        its activation MB per token, alpha1 and alpha2 times compute_factor, bytes_per_token times
        alltoall_factor. A fixed mode plans on this model; "none" without recompute fields is ``self``."""
        if mode == "none" and not self.recompute:
            return self
        views = self._mode_views
        if mode not in views:
            if mode == "none":
                views[mode] = replace(self, recompute={})
            elif mode in self.recompute:
                views[mode] = self._scaled(self.recompute[mode])
            else:
                raise CostModelError(
                    f"cost model '{self.name}' has no recompute mode '{mode}' (has: {', '.join(self.modes)})"
                )
        return views[mode]

    def _scaled(self, r: RecomputeCoeffs) -> Any:
        c, a, m = self.compute, self.alltoall, self.memory
        return replace(
            self,
            compute=replace(
                c,
                alpha1_ms_per_token2=c.alpha1_ms_per_token2 * r.compute_factor,
                alpha2_ms_per_token=c.alpha2_ms_per_token * r.compute_factor,
            ),
            alltoall=replace(a, bytes_per_token=a.bytes_per_token * r.alltoall_factor),
            memory=replace(m, activation_mb_per_token=r.activation_mb_per_token),
            recompute={},
        )

    def envelope(self, modes: Sequence[str]) -> Any:
        """One plain model no slower and no more memory-hungry than any of ``modes`` (per coefficient, the
        least): bounds and memory budgets computed on it hold for plans that mix these modes per group.
        For one mode it is ``for_mode`` of it."""
        views = [self.for_mode(m) for m in modes]
        if len(views) == 1:
            return views[0]
        return replace(
            self,
            compute=replace(
                self.compute,
                alpha1_ms_per_token2=min(v.compute.alpha1_ms_per_token2 for v in views),
                alpha2_ms_per_token=min(v.compute.alpha2_ms_per_token for v in views),
            ),
            alltoall=replace(self.alltoall, bytes_per_token=min(v.alltoall.bytes_per_token for v in views)),
            memory=replace(self.memory, activation_mb_per_token=min(v.memory.activation_mb_per_token for v in views)),
            recompute={},
        )

    def best_mode(self, lengths: Sequence[int], degree: int, modes: Sequence[str] | None = None) -> str | None:
        """The mode of ``modes`` (default: all) with the least group time whose memory fits; None if none fits."""
        best, best_t = None, math.inf
        for m in modes or self.modes:
            if self.fits(sum(lengths), degree, m):
                t = self.group_time_ms(lengths, degree, m)
                if t < best_t:
                    best, best_t = m, t
        return best
