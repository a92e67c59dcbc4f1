"""megatron.core's GPT layer specs, and the one swap FlexSP makes in them.

Why: FlexSP changes only *where* attention runs (inside the micro-batch's SP group, after an
all-to-all from sequence to head sharding); everything else in a layer (QKV projection, RoPE,
output projection, MLP, norms) stays megatron's own. This module adapts megatron's spec (local
modules on CPU, Transformer Engine modules on GPU) and swaps exactly one submodule,
``self_attention.submodules.core_attention``; the spec that puts FlexSP's attention there is the
runtime's (``megatron.flexsp.runtime.layer_spec``): patches never import the runtime.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["get_stock_layer_spec", "replace_core_attention", "have_te"]


def have_te() -> bool:
    """True when Transformer Engine and megatron's TE spec can be imported."""
    try:
        from megatron.core.models.gpt import gpt_layer_specs

        return bool(getattr(gpt_layer_specs, "HAVE_TE", False))
    except ImportError:
        return False


def get_stock_layer_spec(
    transformer_impl: str = "local", *, normalization: str = "RMSNorm", qk_layernorm: bool = False
):
    """megatron.core's own GPT layer spec (no FlexSP), for ``transformer_impl`` local or transformer_engine."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if transformer_impl == "local":
        return specs.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    if transformer_impl == "transformer_engine":
        if not have_te():
            raise RuntimeError(
                "transformer_impl='transformer_engine' needs Transformer Engine "
                "(pip install transformer_engine[pytorch]); use transformer_impl='local' without it"
            )
        # The TE spec reads the norm type from TransformerConfig.normalization.
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    raise ValueError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")


def replace_core_attention(spec, core_attention: Any):
    """A deep copy of a GPT layer ``spec`` whose self-attention uses ``core_attention``."""
    spec = copy.deepcopy(spec)
    try:
        attn_sub = spec.submodules.self_attention.submodules
        _ = attn_sub.core_attention
    except AttributeError as e:
        raise TypeError(f"layer spec has no self_attention.submodules.core_attention to replace: {e}") from None
    attn_sub.core_attention = core_attention
    return spec
