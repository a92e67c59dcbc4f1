"""Causal SDPA per packed document, with the GQA rule that keeps SDPA off its math kernel.

Why its own module: the SDPA backend is the one that runs everywhere (CPU and GPU), and which
kernel SDPA picks depends on the call (dtype, device, ``enable_gqa``); that rule and its test
live here, apart from the all-to-all and backend choice of ``attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOW_PRECISION", "sdpa_native_gqa", "sdpa_varlen"]

LOW_PRECISION = (torch.bfloat16, torch.float16)

_SDPA_HAS_GQA: bool | None = None


def sdpa_native_gqa(device_type: str, dtype: torch.dtype) -> bool:
    """Whether SDPA may take GQA as is (``enable_gqa``) without falling back to the math kernel.

    Why: on CUDA only the flash kernel takes ``enable_gqa``, and it needs fp16/bf16; the
    memory-efficient kernel does not take it, so fp32 + GQA ran the O(L^2)-memory math kernel
    (4 GB per head group at 32K tokens). There k/v are repeated to the query heads instead,
    which the memory-efficient kernel serves. The CPU's flash kernel takes GQA in any dtype.
    """
    return device_type == "cpu" or (device_type == "cuda" and dtype in LOW_PRECISION)


def _sdpa(q, k, v, scale, dropout_p):
    """SDPA with a causal mask on [1, h, L, d] tensors; kv heads may be fewer (GQA)."""
    global _SDPA_HAS_GQA
    if k.shape[1] != q.shape[1] and sdpa_native_gqa(q.device.type, q.dtype):
        if _SDPA_HAS_GQA is None:
            try:
                F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], enable_gqa=True)
                _SDPA_HAS_GQA = True
            except TypeError:  # torch < 2.5
                _SDPA_HAS_GQA = False
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=True
            )
    if k.shape[1] != q.shape[1]:  # query head i reads kv head i // rep, as enable_gqa does
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)


def sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention within each document [bounds[i], bounds[i+1]) of packed [T, h, d] tensors."""
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, T, d] views
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            outs.append(_sdpa(qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b], scale, dropout_p))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.squeeze(0).transpose(0, 1)  # [T, h, d]
