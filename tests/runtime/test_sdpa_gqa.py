"""fp32 + GQA must not push SDPA onto its O(L^2)-memory math kernel (issue 17, item 2).

On CUDA only the flash kernel takes ``enable_gqa`` and it needs fp16/bf16, so an fp32 call with
``enable_gqa=True`` can only run the math kernel. The rule ``sdpa_native_gqa`` says where the
native GQA call is safe; elsewhere k/v are repeated to the query heads (the memory-efficient
kernel's input). There is no GPU here, so the CUDA fp32 case is emulated by the rule's answer
and the SDPA call is recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron.flexsp.runtime import sdpa as A


def _qkv(h=8, hk=2, L=48, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, n, L, d, generator=g, dtype=dtype) for n in (h, hk, hk))


def test_rule_repeats_kv_for_cuda_fp32_only():
    assert not A.sdpa_native_gqa("cuda", torch.float32)
    assert A.sdpa_native_gqa("cuda", torch.bfloat16) and A.sdpa_native_gqa("cuda", torch.float16)
    assert A.sdpa_native_gqa("cpu", torch.float32)  # the CPU flash kernel takes GQA in fp32


def test_cuda_fp32_call_has_no_enable_gqa_and_same_result(monkeypatch):
    """Emulated CUDA fp32: the SDPA call gets repeated k/v (no enable_gqa); the output is unchanged."""
    q, k, v = _qkv()
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q_, k_, v_, **kw):
        calls.append((q_.shape[1], k_.shape[1], kw.get("enable_gqa", False)))
        return real(q_, k_, v_, **kw)

    monkeypatch.setattr(A, "sdpa_native_gqa", lambda device_type, dtype: False, raising=False)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", recording)
    out = A._sdpa(q, k, v, 0.25, 0.0)
    assert calls and all(hk == hq and not gqa for hq, hk, gqa in calls), calls
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_cpu_fp32_gqa_runs_without_the_math_kernel():
    """On the CPU the GQA call is served by the flash kernel alone (math switched off) and matches math."""
    q, k, v = _qkv()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = A._sdpa(q, k, v, 0.25, 0.0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = A._sdpa(q, k, v, 0.25, 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_results_unchanged_on_cpu():
    """The CPU path is today's call (enable_gqa): bit-identical to a direct SDPA call."""
    q, k, v = _qkv()
    direct = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert torch.equal(A._sdpa(q, k, v, 0.25, 0.0), direct)
