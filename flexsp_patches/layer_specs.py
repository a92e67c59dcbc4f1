"""megatron.core GPT layer specs with the core attention replaced by FlexSP's all-to-all attention.

Why: FlexSP changes only *where* attention runs (inside the micro-batch's SP group, after an
all-to-all from sequence to head sharding); everything else in a layer (QKV projection, RoPE,
output projection, MLP, norms) stays megatron's own. So we take megatron's spec (local modules
on CPU, Transformer Engine modules on GPU) and swap exactly one submodule:
``self_attention.submodules.core_attention``.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["get_flexsp_layer_spec", "get_stock_layer_spec", "replace_core_attention", "have_te"]


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


def get_flexsp_layer_spec(
    transformer_impl: str = "local",
    *,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    attention_backend: str = "sdpa",
):
    """megatron's GPT layer spec with FlexSPCoreAttention as core attention.

    ``attention_backend`` ("sdpa", "flash", "te") is handed to FlexSPCoreAttention as a spec
    parameter.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention

    base = get_stock_layer_spec(transformer_impl, normalization=normalization, qk_layernorm=qk_layernorm)
    core = ModuleSpec(module=FlexSPCoreAttention, params={"backend": attention_backend})
    return replace_core_attention(base, core)
