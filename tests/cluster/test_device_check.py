"""scripts/device_check.sh: without a GPU it stops with a clear message (exit 3); its attention
harness (FlexSPCoreAttention at degree 1 on packed documents, error measure, missing packages)
is checked on CPU against a naive per-document attention."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import device_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU path does not apply")
def test_no_gpu_is_a_clear_stop(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out")), cwd=ROOT)
    assert r.returncode == device_check.NO_GPU_EXIT == 3
    assert "no NVIDIA GPU" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was run or written


def naive(q, k, v, bounds):
    """Causal softmax attention per document, GQA by repeating kv heads; [T, h, d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [h, L, d]
        s = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        mask = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)
        outs.append((s.masked_fill(mask, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def test_attention_harness_matches_naive_reference():
    from flexsp_patches import cpu_compat

    cpu_compat.apply()
    lengths = [1, 5, 23, 9]
    bounds = [0, 1, 6, 29, 38]
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(38, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    cu = torch.tensor(bounds, dtype=torch.int32)
    out, dq, dk, dv = device_check.attention_run("sdpa", q, k, v, cu, max(lengths), go)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref = naive(qq, kk, vv, bounds)
    ref.backward(go)
    assert device_check.max_err(out, ref.detach()) < 1e-10
    for a, b in zip((dq, dk, dv), (qq.grad, kk.grad, vv.grad)):
        assert device_check.max_err(a, b) < 1e-10
    # a wrong result is caught by the same measure
    assert device_check.max_err(out + 0.01 * out.abs().max(), ref.detach()) > 5e-3


def test_attention_check_statuses_and_report():
    r = device_check.attention_check("sdpa", device="cpu", doc_lengths=(3, 40, 7), heads=4, kv_heads=2, dim=16)
    # bf16 SDPA against itself: the kernel's error equals the budget's, so it passes
    assert r.status == "pass" and r.fwd_err == pytest.approx(r.fwd_ref_err) and 0 < r.fwd_ref_err < 0.05
    missing = device_check.attention_check("flash", device="cpu")
    if missing.status == "not installed":
        assert "flash-attn" in missing.detail
    assert device_check.passes(0.01, 0.006) and not device_check.passes(0.02, 0.006)
    assert not device_check.passes(float("nan"), 0.006)
    text = device_check.format_report([r, missing], ("pass", "compute fit ..."),
                                      [device_check.TrainResult("sdpa", "pass", [5.6, 5.1], 1000.0, 12.0)], "cpu")
    assert "sdpa" in text and "5.6000" in text and "profiler: pass" in text
