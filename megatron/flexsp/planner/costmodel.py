"""The alpha-beta cost model of FlexSP in the fixed JSON form of DESIGN.md.

For a group of degree d holding sequences s_1..s_k (T = sum s_i), one micro-batch:

* compute ms   = sum_i (alpha1 * s_i^2 + alpha2 * s_i) / d + beta1
* all-to-all ms = bytes_per_token * T / d / 2^20 / bandwidth_gbs[d]   (0 when d == 1)
* memory MB/GPU = model_states_mb + activation_mb_per_token * T / d  (<= limit_gb * 1024)

Estimates for this form follow exactly these formulas; everything else (capacities, smallest
feasible degree, allowed degrees) is derived from them here, in one place.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recompute import CostModelError, RecomputeCoeffs, RecomputeModes, parse_recompute, recompute_to_dict

__all__ = [
    "CostModelError",
    "ComputeCoeffs",
    "AllToAllCoeffs",
    "MemoryCoeffs",
    "CostModel",
    "alltoall_bytes_per_token",
    "build_cost_model",
]


@dataclass(frozen=True)
class ComputeCoeffs:
    alpha1_ms_per_token2: float
    alpha2_ms_per_token: float
    beta1_ms: float


@dataclass(frozen=True)
class AllToAllCoeffs:
    bytes_per_token: float
    bandwidth_gbs: Mapping[int, float]


@dataclass(frozen=True)
class MemoryCoeffs:
    limit_gb: float
    model_states_mb: float
    activation_mb_per_token: float


def _num(d: Mapping[str, Any], key: str, where: str, *, positive: bool = False, nonneg: bool = True) -> float:
    if key not in d:
        raise CostModelError(f"cost model: missing field '{where}{key}'")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CostModelError(f"cost model: field '{where}{key}' must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise CostModelError(f"cost model: field '{where}{key}' must be > 0, got {v!r}")
    if nonneg and v < 0:
        raise CostModelError(f"cost model: field '{where}{key}' must be >= 0, got {v!r}")
    return float(v)


def _int(d: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    if key not in d:
        if default is not None:
            return default
        raise CostModelError(f"cost model: missing field '{key}'")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CostModelError(f"cost model: field '{key}' must be a positive integer, got {v!r}")
    return v


def _bandwidths(bw_raw: Any) -> dict[int, float]:
    """``alltoall.bandwidth_gbs`` as {degree: GB/s}, every key an integer degree >= 2."""
    if not isinstance(bw_raw, Mapping) or not bw_raw:
        raise CostModelError("cost model: 'alltoall.bandwidth_gbs' must be a non-empty object {degree: GB/s}")
    bw: dict[int, float] = {}
    for k in bw_raw:
        try:
            deg = int(k)
        except (TypeError, ValueError):
            raise CostModelError(f"cost model: 'alltoall.bandwidth_gbs' key {k!r} is not an integer degree") from None
        if deg < 2:
            raise CostModelError(f"cost model: 'alltoall.bandwidth_gbs' key {k!r}: degrees start at 2")
        bw[deg] = _num(bw_raw, k, "alltoall.bandwidth_gbs.", positive=True)
    return bw


# top-level keys of the JSON form; any other is kept in ``extra`` and written back on save
_KNOWN_KEYS = frozenset(
    {
        "name",
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "gpus_per_node",
        "compute",
        "alltoall",
        "memory",
        "recompute",
    }
)


@dataclass(frozen=True)
class CostModel(RecomputeModes):
    """Profiled costs of one model on one cluster (paper form, units of the public FlexSP solver).

    Recompute modes (``modes``, ``for_mode``, ``envelope``, ``best_mode``) come from ``RecomputeModes``.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    gpus_per_node: int
    compute: ComputeCoeffs
    alltoall: AllToAllCoeffs
    memory: MemoryCoeffs
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown top-level keys, kept on save
    recompute: Mapping[str, RecomputeCoeffs] = field(default_factory=dict)  # optional modes (recompute.py)

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostModel:
        if not isinstance(d, Mapping):
            raise CostModelError(f"cost model: expected a JSON object, got {type(d).__name__}")
        for sec in ("compute", "alltoall", "memory"):
            if not isinstance(d.get(sec), Mapping):
                raise CostModelError(f"cost model: missing or malformed section '{sec}'")
        c, a, m = d["compute"], d["alltoall"], d["memory"]
        heads = _int(d, "num_attention_heads")
        groups = _int(d, "num_query_groups", default=heads)
        if heads % groups:
            raise CostModelError(
                f"cost model: 'num_attention_heads' ({heads}) must be a multiple of 'num_query_groups' ({groups})"
            )
        bw = _bandwidths(a.get("bandwidth_gbs"))
        model = cls(
            name=str(d.get("name", "")),
            num_layers=_int(d, "num_layers"),
            hidden_size=_int(d, "hidden_size"),
            num_attention_heads=heads,
            num_query_groups=groups,
            gpus_per_node=_int(d, "gpus_per_node"),
            compute=ComputeCoeffs(
                _num(c, "alpha1_ms_per_token2", "compute."),
                _num(c, "alpha2_ms_per_token", "compute."),
                _num(c, "beta1_ms", "compute."),
            ),
            alltoall=AllToAllCoeffs(_num(a, "bytes_per_token", "alltoall."), dict(sorted(bw.items()))),
            memory=MemoryCoeffs(
                _num(m, "limit_gb", "memory.", positive=True),
                _num(m, "model_states_mb", "memory."),
                _num(m, "activation_mb_per_token", "memory.", positive=True),
            ),
            extra={k: v for k, v in d.items() if k not in _KNOWN_KEYS},
            recompute=parse_recompute(d["recompute"]) if "recompute" in d else {},
        )
        if model.memory.model_states_mb >= model.memory.limit_gb * 1024:
            raise CostModelError(
                f"cost model: 'memory.model_states_mb' ({model.memory.model_states_mb}) leaves no room under "
                f"'memory.limit_gb' ({model.memory.limit_gb} GB = {model.memory.limit_gb * 1024} MB)"
            )
        return model

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "gpus_per_node": self.gpus_per_node,
            "compute": {
                "alpha1_ms_per_token2": self.compute.alpha1_ms_per_token2,
                "alpha2_ms_per_token": self.compute.alpha2_ms_per_token,
                "beta1_ms": self.compute.beta1_ms,
            },
            "alltoall": {
                "bytes_per_token": self.alltoall.bytes_per_token,
                "bandwidth_gbs": {str(k): v for k, v in self.alltoall.bandwidth_gbs.items()},
            },
            "memory": {
                "limit_gb": self.memory.limit_gb,
                "model_states_mb": self.memory.model_states_mb,
                "activation_mb_per_token": self.memory.activation_mb_per_token,
            },
        }
        if self.recompute:
            d["recompute"] = recompute_to_dict(self.recompute)
        d.update(self.extra)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------ formulas
    # ``mode``: a recompute mode of ``modes``; "none" is the top-level coefficients (DESIGN.md's formulas)
    def compute_ms(self, lengths: Iterable[int], degree: int, mode: str = "none") -> float:
        if mode != "none":
            return self.for_mode(mode).compute_ms(lengths, degree)
        c = self.compute
        work = sum(c.alpha1_ms_per_token2 * s * s + c.alpha2_ms_per_token * s for s in lengths)
        return work / degree + c.beta1_ms

    def alltoall_ms(self, total_tokens: float, degree: int, mode: str = "none") -> float:
        if mode != "none":
            return self.for_mode(mode).alltoall_ms(total_tokens, degree)
        if degree == 1:
            return 0.0
        return self.alltoall.bytes_per_token * total_tokens / degree / 2**20 / self.bandwidth(degree)

    def memory_mb(self, total_tokens: float, degree: int, mode: str = "none") -> float:
        if mode != "none":
            return self.for_mode(mode).memory_mb(total_tokens, degree)
        return self.memory.model_states_mb + self.memory.activation_mb_per_token * total_tokens / degree

    def group_time_ms(self, lengths: Sequence[int], degree: int, mode: str = "none") -> float:
        """Compute plus all-to-all of one group in one micro-batch."""
        if mode != "none":
            return self.for_mode(mode).group_time_ms(lengths, degree)
        return self.compute_ms(lengths, degree) + self.alltoall_ms(sum(lengths), degree)

    def bandwidth(self, degree: int) -> float:
        try:
            return self.alltoall.bandwidth_gbs[degree]
        except KeyError:
            raise CostModelError(
                f"cost model '{self.name}': no all-to-all bandwidth for degree {degree} "
                f"(known: {sorted(self.alltoall.bandwidth_gbs)})"
            ) from None

    # ---------------------------------------------------- derived quantities
    @property
    def limit_mb(self) -> float:
        return self.memory.limit_gb * 1024

    @functools.cached_property
    def tokens_per_gpu(self) -> int:
        """Activation tokens one GPU can hold next to its model states."""
        return int(
            math.floor((self.limit_mb - self.memory.model_states_mb) / self.memory.activation_mb_per_token + 1e-9)
        )

    def capacity(self, degree: int, mode: str = "none") -> int:
        """Most tokens a group of this degree can hold in one micro-batch."""
        if mode != "none":
            return self.for_mode(mode).capacity(degree)
        return self.tokens_per_gpu * degree

    def fits(self, total_tokens: float, degree: int, mode: str = "none") -> bool:
        """Whether a group of this degree holds ``total_tokens`` in one micro-batch.

        Same as ``total_tokens <= capacity(degree)``: each of the d GPUs holds ceil(T / d) tokens
        of the packed group, so T <= d * tokens_per_gpu. This is at most d - 1 tokens stricter
        than the plain formula T / d, and keeps capacity, fits and smallest_degree consistent.
        """
        return total_tokens <= self.capacity(degree, mode)

    def allowed_degrees(self, world_size: int) -> list[int]:
        """Degrees a plan may use on ``world_size`` ranks.

        d divides the head count and d <= world_size; d = 1 or its bandwidth is profiled;
        a group inside one node has d dividing gpus_per_node (so groups tile a node), a larger
        group spans whole nodes (d a multiple of gpus_per_node).
        """
        g = self.gpus_per_node
        out = []
        for d in range(1, world_size + 1):
            if self.num_attention_heads % d:
                continue
            if d > 1 and d not in self.alltoall.bandwidth_gbs:
                continue
            if (d <= g and g % d) or (d > g and d % g):
                continue
            out.append(d)
        return out

    def smallest_degree(self, length: int, world_size: int) -> int | None:
        """Smallest allowed degree whose group holds one sequence of ``length``; None if none does."""
        for d in self.allowed_degrees(world_size):
            if self.fits(length, d):
                return d
        return None

    def check_world_size(self, world_size: int) -> None:
        g = self.gpus_per_node
        if world_size <= 0:
            raise CostModelError(f"world size must be positive, got {world_size}")
        if world_size > g and world_size % g:
            raise CostModelError(
                f"world size {world_size} is not a multiple of gpus_per_node {g} in cost model '{self.name}'"
            )


# --------------------------------------------------------------------------- builders


def alltoall_bytes_per_token(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    bytes_per_element: int = 2,
) -> float:
    """All-to-all volume of one token through the whole model, forward and backward.

    Per layer and pass, Ulysses exchanges q, k, v before attention and the output after it:
    q and output carry ``hidden`` values, k and v carry ``hidden * groups / heads`` each (GQA).
    Backward exchanges the same tensors' gradients.
    """
    groups = num_query_groups or num_attention_heads
    per_layer = 2 * hidden_size + 2 * hidden_size * groups / num_attention_heads
    return float(2 * num_layers * per_layer * bytes_per_element)


def build_cost_model(
    *,
    name: str,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    gpus_per_node: int,
    alpha1_ms_per_token2: float,
    alpha2_ms_per_token: float,
    beta1_ms: float,
    bandwidth_gbs: Mapping[int, float],
    limit_gb: float,
    activation_mb_per_token: float,
    model_states_mb: float | None = None,
    num_parameters: float | None = None,
    world_size: int | None = None,
    bytes_per_element: int = 2,
) -> CostModel:
    """A cost model from model shape plus hardware numbers.

    Model states are either given in MB per GPU or derived for ZeRO-3 as
    ``num_parameters * 16 bytes / world_size`` (bf16 weights and grads, fp32 master and Adam moments).
    """
    if model_states_mb is None:
        if num_parameters is None or world_size is None:
            raise CostModelError("give model_states_mb, or num_parameters and world_size for ZeRO-3 model states")
        model_states_mb = num_parameters * 16 / world_size / 2**20
    groups = num_query_groups or num_attention_heads
    return CostModel.from_dict(
        {
            "name": name,
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "num_attention_heads": num_attention_heads,
            "num_query_groups": groups,
            "gpus_per_node": gpus_per_node,
            "compute": {
                "alpha1_ms_per_token2": alpha1_ms_per_token2,
                "alpha2_ms_per_token": alpha2_ms_per_token,
                "beta1_ms": beta1_ms,
            },
            "alltoall": {
                "bytes_per_token": alltoall_bytes_per_token(
                    num_layers, hidden_size, num_attention_heads, groups, bytes_per_element
                ),
                "bandwidth_gbs": {str(k): v for k, v in bandwidth_gbs.items()},
            },
            "memory": {
                "limit_gb": limit_gb,
                "model_states_mb": model_states_mb,
                "activation_mb_per_token": activation_mb_per_token,
            },
        }
    )
