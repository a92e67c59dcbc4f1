"""RoPE that follows position ids (positions restart at every packed document).

Why: megatron.core's GPTModel builds its rotary embedding from a *length*
(``self.rotary_pos_emb(rotary_seq_len, ...)``), i.e. positions 0..n-1, and in the THD (packed)
format its rotary application re-derives positions from ``cu_seqlens`` assuming megatron's own
context-parallel layout (each rank holds two zig-zag chunks of *every* sequence). FlexSP gives
each rank one contiguous slice of its group's packed tokens, so neither matches; the position
ids of the slice (which restart at every document) are the only correct source.

Mechanism (two narrow hooks, both inert unless a model was attached with ``attach``):

1. ``attach(model)``: a forward pre-hook on the GPTModel records the ``position_ids`` argument
   of the call, and the model's ``rotary_pos_emb`` module (megatron's RotaryEmbedding) becomes a
   ``PositionIdsRotaryEmbedding`` whose forward returns per-token frequencies
   ``freqs[s, b, 1, d] = position_ids[b, s] * inv_freq`` (same arithmetic as megatron's
   ``get_freqs_non_repeated`` + ``get_emb``) instead of frequencies of 0..max_seq_len-1.
   The tensor is marked by its type, ``PerTokenRotaryFreqs`` (a plain torch.Tensor subclass
   with no behaviour): unlike a Python attribute, the type survives what megatron and torch
   do to the argument on its way to the attention (``detach`` in activation recomputation,
   dtype casts of module inputs).
2. ``install()``: replaces the name ``apply_rotary_pos_emb`` in
   ``megatron.core.transformer.attention`` (megatron's rope dispatcher, imported there from
   rope_utils) by a wrapper that, for per-token frequencies (marker type), applies megatron's own
   unfused ``_apply_rotary_pos_emb_bshd`` token by token (on a plain-tensor view, so the marker
   type never reaches the activations) and ignores ``cu_seqlens``; every other call goes to the
   original unchanged. Only the unfused path is used (the model config sets
   ``apply_rope_fusion=False``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["install", "attach", "bshd_caller", "PositionIdsRotaryEmbedding", "PerTokenRotaryFreqs", "per_token_freqs"]


class PerTokenRotaryFreqs(torch.Tensor):
    """Marker type: rotary frequencies of explicit per-token positions, [s, b, 1, d]."""


def per_token_freqs(
    inv_freq: Tensor,
    position_ids: Tensor,
    *,
    rotary_interleaved: bool = False,
    seq_len_interpolation_factor: float | None = None,
) -> Tensor:
    """Rotary frequencies for explicit positions: [b, s] ids -> [s, b, 1, rot_dim]."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(position_ids.shape)}")
    seq = position_ids.to(device=inv_freq.device, dtype=inv_freq.dtype)
    if seq_len_interpolation_factor is not None:
        seq = seq * (1 / seq_len_interpolation_factor)
    freqs = seq[..., None] * inv_freq  # [b, s, d/2], the same products as torch.outer(seq, inv_freq)
    if not rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    emb = emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, d]
    return emb.as_subclass(PerTokenRotaryFreqs)


def _base_rotary_cls():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding


class PositionIdsRotaryEmbedding(_base_rotary_cls()):  # type: ignore[misc]
    """megatron RotaryEmbedding whose forward uses the position ids of the current model call.

    Outside a call that recorded position ids (``_flexsp_position_ids is None``) it behaves like
    megatron's RotaryEmbedding. The frequencies are megatron's ``inv_freq`` as its constructor left
    them, so Llama 3.1 RoPE scaling (``rope_scaling=True``, applied there) carries over unchanged.
    """

    _flexsp_position_ids: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any):  # megatron's (max_seq_len, offset=0, packed_seq, cp_group)
        pos = self._flexsp_position_ids
        if pos is None:
            return super().forward(*args, **kwargs)
        offset = kwargs.get("offset", args[1] if len(args) > 1 else 0)
        if offset:
            pos = pos + offset
        inv_freq = self.inv_freq
        if inv_freq.device != pos.device:
            inv_freq = inv_freq.to(pos.device)
            self.inv_freq = inv_freq
        return per_token_freqs(
            inv_freq,
            pos,
            rotary_interleaved=self.rotary_interleaved,
            seq_len_interpolation_factor=self.seq_len_interpolation_factor,
        )


def _record_position_ids(module, args, kwargs):
    pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    rot = getattr(module, "rotary_pos_emb", None)
    if isinstance(rot, PositionIdsRotaryEmbedding):
        rot._flexsp_position_ids = pos
    return None


def _clear_position_ids(module, args, kwargs, output):
    rot = getattr(module, "rotary_pos_emb", None)
    if isinstance(rot, PositionIdsRotaryEmbedding):
        rot._flexsp_position_ids = None
    return None


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (a megatron GPTModel with RoPE) rotate by its ``position_ids``. Idempotent.

    Models without a ``rotary_pos_emb`` (learned-absolute positions use the ids natively) are
    returned unchanged.
    """
    install()
    rot = getattr(model, "rotary_pos_emb", None)
    if rot is None or getattr(model, "_flexsp_rope_attached", False):
        return model
    base = _base_rotary_cls()
    if type(rot) is not base:
        raise TypeError(
            f"flexsp RoPE: model.rotary_pos_emb is {type(rot).__name__}; only megatron's plain "
            f"RotaryEmbedding (position_embedding_type='rope') is supported"
        )
    rot.__class__ = PositionIdsRotaryEmbedding
    model.register_forward_pre_hook(_record_position_ids, with_kwargs=True)
    model.register_forward_hook(_clear_position_ids, with_kwargs=True, always_call=True)
    model._flexsp_rope_attached = True
    return model


def bshd_caller(bshd: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Call megatron's ``_apply_rotary_pos_emb_bshd`` with the MLA flag under the name it takes.

    megatron-core 0.19 renamed ``multi_latent_attention`` to ``mla_rotary_interleaved`` and warns
    (DeprecationWarning) on every call that still uses the old name; 0.16 knows only the old one.
    The signature is inspected once here, not per call.
    """
    params = inspect.signature(bshd).parameters
    mla_name = "mla_rotary_interleaved" if "mla_rotary_interleaved" in params else "multi_latent_attention"

    def call(t: Tensor, freqs: Tensor, *, rotary_interleaved: bool, mla: bool, mscale: float) -> Tensor:
        return bshd(t, freqs, rotary_interleaved=rotary_interleaved, mscale=mscale, **{mla_name: mla})

    call.mla_name = mla_name  # type: ignore[attr-defined]
    return call


def install() -> None:
    """Route tagged per-token frequencies around megatron's cu_seqlens-based RoPE. Idempotent."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention as mattn

    orig = getattr(mattn, "apply_rotary_pos_emb", None)
    if orig is None:
        raise RuntimeError(
            "flexsp RoPE: megatron.core.transformer.attention has no apply_rotary_pos_emb; "
            "this megatron-core version is not supported by flexsp_patches.rope"
        )
    if getattr(orig, "_flexsp_rope", False):
        return
    bshd = bshd_caller(rope_utils._apply_rotary_pos_emb_bshd)

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None, **kw):
        if not isinstance(freqs, PerTokenRotaryFreqs):
            return orig(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kw)
        freqs = freqs.as_subclass(torch.Tensor)
        if freqs.size(0) != t.size(0):
            raise RuntimeError(f"flexsp RoPE: {freqs.size(0)} per-token frequencies for {t.size(0)} tokens")
        # megatron-core 0.19 callers may pass the MLA flag; otherwise it follows the config, as there.
        mla = kw.get("mla_rotary_interleaved")
        mla = bool(config.multi_latent_attention if mla is None else mla)
        if t.dim() == 3:  # THD: [t, h, d] -> [t, 1, h, d]
            return bshd(
                t.unsqueeze(1), freqs, rotary_interleaved=config.rotary_interleaved, mla=mla, mscale=mscale
            ).squeeze(1)
        return bshd(t, freqs, rotary_interleaved=config.rotary_interleaved, mla=mla, mscale=mscale)

    apply_rotary_pos_emb._flexsp_rope = True  # type: ignore[attr-defined]
    mattn.apply_rotary_pos_emb = apply_rotary_pos_emb
