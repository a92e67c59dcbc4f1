"""The shipped cost models: the FlexSP paper's cluster (GPT 7B/13B/30B) and the CPU test cluster.

Why a module of its own: these are data (measured coefficients and where they came from), not
the cost model's logic. ``load_cost_model`` reads a JSON file or a preset by name; ``costmodel``
re-exports ``preset``, ``PRESET_NAMES`` and ``load_cost_model`` so existing imports keep working.
"""

from __future__ import annotations

import json
from pathlib import Path

from .costmodel import CostModel, CostModelError, alltoall_bytes_per_token, build_cost_model
from .model_presets import MODEL_PRESET_NAMES, model_cost_preset

__all__ = ["PRESET_NAMES", "PAPER_WORLD_SIZE", "preset", "load_cost_model"]

PAPER_WORLD_SIZE = 64  # the paper's cluster: the world size a preset assumes when none is given


# The paper's cluster: 64 x A100-40G, 8 per node, 30 GB usable; coefficients of the public
# FlexSP solver. The solver's models use 64 attention heads, so degrees up to 64 divide them.
_PAPER_BANDWIDTH = {2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}
_PAPER_MODELS = {
    "gpt-7b": dict(
        num_layers=32, hidden_size=4096, alpha1=5.128e-6, alpha2=0.18396, beta1=629.36, act=4.48, params=7e9
    ),
    "gpt-13b": dict(
        num_layers=40, hidden_size=5120, alpha1=9.2852e-6, alpha2=0.30602, beta1=1132.56, act=4.22, params=13e9
    ),
    "gpt-30b": dict(
        num_layers=60, hidden_size=6656, alpha1=15.4262e-6, alpha2=0.80357, beta1=2789.36, act=3.42, params=30e9
    ),
}
# The CPU test cluster: 4 gloo ranks in one "node" running the small GPT of the quickstart.
# Coefficients are what `flexsp-profile` measured on the 2-core development machine; the
# memory limit is artificial, so that long documents need several ranks as on a GPU cluster.
# Measured on the emulated CPU cluster (2 network-namespace "nodes" x 2 gloo ranks, 200 Mbit/s tc-shaped
# inter-node links, loopback inside a node; 2-core machine shared with other work, so --profile-stat min):
#   bash scripts/emulated_cluster.sh --link-mbit 200 -- -m megatron.flexsp.training.profiler --num-layers 2 \
#     --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --group-query-attention --swiglu \
#     --seq-length 2048 --capacity-tokens 512 --profile-stat min --output cost_model.json
# compute and alltoall are its numbers (degree 2 stays inside a node, degree 4 crosses the link; beta1
# includes the per-micro-batch ZeRO-3 gathers over the link). The memory section is artificial: a rank
# holds 512 tokens, so documents of the 2048-token default need groups of 2-4 ranks.
_CPU_PRESET = {
    "name": "cpu-tiny: small GPT on 2 emulated nodes x 2 gloo ranks (scripts/emulated_cluster.sh, 200 Mbit/s)",
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "gpus_per_node": 2,
    "compute": {"alpha1_ms_per_token2": 5.52e-5, "alpha2_ms_per_token": 0.0562, "beta1_ms": 78.0},
    "alltoall": {
        "bytes_per_token": alltoall_bytes_per_token(2, 64, 4, 2, 4),
        "bandwidth_gbs": {"2": 0.127, "4": 0.0178},
    },
    "memory": {"limit_gb": 1.0, "model_states_mb": 512.0, "activation_mb_per_token": 1.0},
}

# The same model and cluster with replicated model states (--flexsp-sharding ddp), profiled by the same command
# plus --flexsp-sharding ddp: no per-micro-batch parameter gathers over the link, so beta1 is 16 ms, not 78 ms.
_CPU_DDP_PRESET = dict(
    _CPU_PRESET,
    name="cpu-tiny-ddp: cpu-tiny with replicated model states (--flexsp-sharding ddp), emulated 2x2, 200 Mbit/s",
    compute={"alpha1_ms_per_token2": 4.96e-5, "alpha2_ms_per_token": 0.0496, "beta1_ms": 16.2},
    alltoall={"bytes_per_token": alltoall_bytes_per_token(2, 64, 4, 2, 4), "bandwidth_gbs": {"2": 0.157, "4": 0.019}},
)

# The model presets (--model-preset) get a cost model of their shape from the analytic prior (model_presets.py).
PRESET_NAMES = ("gpt-7b", "gpt-13b", "gpt-30b", "cpu-tiny", "cpu-tiny-ddp", *MODEL_PRESET_NAMES)


def preset(name: str, world_size: int = PAPER_WORLD_SIZE) -> CostModel:
    """A shipped cost model by name; the paper presets derive ZeRO-3 model states from ``world_size``."""
    key = name.lower()
    if key in _PAPER_MODELS:
        p = _PAPER_MODELS[key]
        return build_cost_model(
            name=f"{key} on A100-40G x {world_size} (FlexSP paper cluster)",
            num_layers=p["num_layers"],
            hidden_size=p["hidden_size"],
            num_attention_heads=64,
            num_query_groups=64,
            gpus_per_node=8,
            alpha1_ms_per_token2=p["alpha1"],
            alpha2_ms_per_token=p["alpha2"],
            beta1_ms=p["beta1"],
            bandwidth_gbs=_PAPER_BANDWIDTH,
            limit_gb=30.0,
            activation_mb_per_token=p["act"],
            num_parameters=p["params"],
            world_size=world_size,
        )
    if key == "cpu-tiny":
        return CostModel.from_dict(_CPU_PRESET)
    if key == "cpu-tiny-ddp":
        return CostModel.from_dict(_CPU_DDP_PRESET)
    if key in MODEL_PRESET_NAMES:
        return model_cost_preset(key, world_size)
    raise CostModelError(f"unknown cost-model preset '{name}' (presets: {', '.join(PRESET_NAMES)})")


def load_cost_model(spec: str | Path, world_size: int = PAPER_WORLD_SIZE) -> CostModel:
    """A cost model from a JSON file path or a preset name."""
    p = Path(spec)
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise CostModelError(f"cost model file not found: {p}")
        if p.is_dir():
            raise CostModelError(f"cost model {p} is a directory, not a JSON file")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CostModelError(f"cost model file {p} is not valid JSON: {e}") from None
        return CostModel.from_dict(data)
    return preset(str(spec), world_size)
