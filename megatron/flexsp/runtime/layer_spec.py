"""megatron.core's GPT layer spec with FlexSP's all-to-all attention as core attention.

Why here and not in flexsp_patches: the spec names the runtime's ``FlexSPCoreAttention``, so it
belongs to the runtime (patches adapt megatron.core and never import the runtime).
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from flexsp_patches.layer_specs import get_stock_layer_spec, replace_core_attention

from .attention import FlexSPCoreAttention

__all__ = ["get_flexsp_layer_spec"]


def get_flexsp_layer_spec(
    transformer_impl: str = "local",
    *,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    attention_backend: str = "sdpa",
) -> ModuleSpec:
    """megatron's GPT layer spec (``transformer_impl`` local or transformer_engine) with FlexSPCoreAttention.

    ``attention_backend`` ("sdpa", "flash", "te", "auto") is handed to FlexSPCoreAttention as a
    spec parameter.
    """
    base = get_stock_layer_spec(transformer_impl, normalization=normalization, qk_layernorm=qk_layernorm)
    core = ModuleSpec(module=FlexSPCoreAttention, params={"backend": attention_backend})
    return replace_core_attention(base, core)
