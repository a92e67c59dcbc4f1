"""The tensor mapping between Hugging Face Llama / Qwen2 / Mistral and megatron.core's GPTModel.

Pure functions over state dicts (name -> tensor), no I/O, so the mapping is tested on its own.

Why these layouts (megatron-core 0.16.1, checked against its code):

* ``linear_qkv`` holds q, k and v **per query group**: for each of the G kv groups, its H/G query
  heads, then its k head, then its v head (``SelfAttention.get_query_key_value_tensors`` views
  the projection as [.., G, (H/G + 2) * d] and splits [H/G * d, d, d]). With GQA this is not
  [all q; all k; all v].
* ``linear_fc1`` of a SwiGLU MLP is [gate; up] (megatron's glu chunks the output in two and
  applies the activation to the first half).
* Norms: with the local layer spec ``input_layernorm`` / ``pre_mlp_layernorm`` are modules of
  their own; with the Transformer Engine spec they are fused into the next linear
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``).
* Vocabulary: megatron's tables have the padded number of rows; the extra rows are zero on import
  and dropped on export (a token id >= the real vocabulary never occurs).
* RoPE: both sides rotate halves (``rotate_half`` / megatron's non-interleaved RoPE), so q and k
  rows are not permuted.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch

from .errors import ConvertError
from .hf_config import HFModel

__all__ = ["LAYER_NAMES", "expected_hf_shapes", "hf_to_megatron", "megatron_to_hf", "norm_names"]

_HF = "model.layers.{i}."
# megatron name (inside decoder.layers.{i}.) -> HF name (inside model.layers.{i}.), one-to-one tensors
LAYER_NAMES = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def norm_names(transformer_impl: str) -> tuple[str, str]:
    """Megatron names (inside a layer) of the attention and MLP input norms for a layer spec."""
    if transformer_impl == "transformer_engine":
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    if transformer_impl == "local":
        return "input_layernorm.weight", "pre_mlp_layernorm.weight"
    raise ConvertError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")


def expected_hf_shapes(m: HFModel) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``m`` holds, with its shape."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    if not m.tied:
        out["lm_head.weight"] = (m.vocab_size, h)
    for i in range(m.num_layers):
        p = _HF.format(i=i)
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        if m.qkv_bias:
            out.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    return out


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] per query group: group g's query rows, then its k rows, then its v rows."""
    parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:]).contiguous()


def _split_qkv(qkv: torch.Tensor, m: HFModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = m.num_query_groups, m.head_dim
    per = m.num_attention_heads // g * d
    x = qkv.reshape(g, per + 2 * d, *qkv.shape[1:])
    q, k, v = torch.split(x, [per, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))  # type: ignore[return-value]


def _pad_rows(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ConvertError(f"{name} has {t.shape[0]} rows, more than the padded vocabulary table ({rows})")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor] | MutableMapping[str, torch.Tensor],
    m: HFModel,
    *,
    padded_vocab_size: int,
    transformer_impl: str = "local",
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """GPTModel state dict (megatron names) of the Hugging Face tensors ``hf`` (checked beforehand
    against ``expected_hf_shapes``); dtypes are kept. ``consume`` removes each source tensor from
    ``hf`` once used, so the fused copies do not sit next to all of their sources."""
    in_norm, mlp_norm = norm_names(transformer_impl)

    def take(name: str) -> torch.Tensor:
        return hf.pop(name) if consume else hf[name]  # type: ignore[union-attr]

    out = {
        "embedding.word_embeddings.weight": _pad_rows(
            take("model.embed_tokens.weight"), padded_vocab_size, "model.embed_tokens.weight"
        ),
        "decoder.final_layernorm.weight": take("model.norm.weight"),
    }
    if not m.tied:
        out["output_layer.weight"] = _pad_rows(take("lm_head.weight"), padded_vocab_size, "lm_head.weight")
    for i in range(m.num_layers):
        p, o = _HF.format(i=i), f"decoder.layers.{i}."
        out[o + in_norm] = take(p + "input_layernorm.weight")
        out[o + mlp_norm] = take(p + "post_attention_layernorm.weight")
        qkv = [take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        out[o + "self_attention.linear_qkv.weight"] = _fuse_qkv(*qkv, m.num_query_groups)
        if m.qkv_bias:
            qkv_b = [take(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            out[o + "self_attention.linear_qkv.bias"] = _fuse_qkv(*qkv_b, m.num_query_groups)
        out[o + "mlp.linear_fc1.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        for mname, hname in LAYER_NAMES.items():
            out[o + mname] = take(p + hname)
    return out


def megatron_to_hf(
    state: Mapping[str, torch.Tensor] | MutableMapping[str, torch.Tensor],
    m: HFModel,
    *,
    dtype: torch.dtype | None = None,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of a GPTModel state dict (local or Transformer Engine names), with the
    vocabulary cut back to ``m.vocab_size`` rows; every tensor is its own contiguous copy, in
    ``dtype`` (default: as stored). ``consume`` removes each source tensor from ``state`` once
    copied, so an export holds the model about once (plus a layer), not twice."""
    te = any(k.endswith("linear_qkv.layer_norm_weight") for k in state)
    in_norm, mlp_norm = norm_names("transformer_engine" if te else "local")
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ConvertError(f"the checkpoint has no tensor {name!r}")
        return state.pop(name) if consume else state[name]  # type: ignore[union-attr]

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.detach().to(dtype=dtype or t.dtype, copy=True).contiguous()

    put("model.embed_tokens.weight", take("embedding.word_embeddings.weight")[: m.vocab_size])
    put("model.norm.weight", take("decoder.final_layernorm.weight"))
    if not m.tied:
        put("lm_head.weight", take("output_layer.weight")[: m.vocab_size])
    f = m.ffn_hidden_size
    for i in range(m.num_layers):
        p, o = _HF.format(i=i), f"decoder.layers.{i}."
        put(p + "input_layernorm.weight", take(o + in_norm))
        put(p + "post_attention_layernorm.weight", take(o + mlp_norm))
        for x, t in zip("qkv", _split_qkv(take(o + "self_attention.linear_qkv.weight"), m)):
            put(p + f"self_attn.{x}_proj.weight", t)
        if m.qkv_bias:
            for x, t in zip("qkv", _split_qkv(take(o + "self_attention.linear_qkv.bias"), m)):
                put(p + f"self_attn.{x}_proj.bias", t)
        fc1 = take(o + "mlp.linear_fc1.weight")
        put(p + "mlp.gate_proj.weight", fc1[:f])
        put(p + "mlp.up_proj.weight", fc1[f:])
        for mname, hname in LAYER_NAMES.items():
            put(p + hname, take(o + mname))
    return out
