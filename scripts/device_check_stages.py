"""GPU stages of the device check that run as their own bounded processes (issue 17, item 7).

Why separate processes: a kernel that hangs or a 32K-token reference that crawls must end at its
stage's time limit and be reported as TIMEOUT, and only a process can be stopped from outside.
``device_check.py`` starts ``python scripts/device_check_stages.py STAGE --result FILE`` under
its time limit and reads the JSON this writes: ``{"status", "detail", "rows"}``.

* ``attention-matrix``: every attention backend (sdpa, flash, te) against SDPA's math kernel in
  fp32, in fp32 and bf16, with GQA, at about 4K and 32K packed tokens, forward and backward. The
  SDPA backend under test runs with the math kernel switched off, so a call that could only run
  on math (fp32 + ``enable_gqa``) fails here instead of quietly using O(L^2) memory.
* ``te-rebuild``: Transformer Engine attention on a series of new packed shapes (FlexSP changes
  the shape every micro-batch): the first call of each shape against a repeat of it; the
  difference is the per-shape set-up (cuDNN graph build) a training step pays.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from device_check import attention_run, max_err, passes, unavailable  # noqa: E402

# Packed documents: ~4K tokens, and 32K tokens whose longest document (8K) keeps the fp32 math
# reference at 2 GB of scores per call with the head count below.
DOCS = {
    "4K": (1, 17, 300, 1024, 2048, 706),
    "32K": (8192, 8192, 8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1),
}
HEADS, KV_HEADS, DIM = 8, 2, 64  # GQA
TE_SHAPES = ((512, 1536, 2048), (1000, 3000), (4096,), (77, 2000, 2019), (2500, 2500, 123), (64,) * 64)


def _inputs(docs: tuple[int, ...], device: str = "cuda", seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    total = sum(docs)
    q, go = (torch.randn(total, HEADS, DIM, generator=g).to(device) for _ in range(2))
    k, v = (torch.randn(total, KV_HEADS, DIM, generator=g).to(device) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(docs), go


def _no_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        fast.append(SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(fast)


def _timed(fn) -> tuple[Any, float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


def _matrix_row(backend: str, dtype_name: str, size: str, ref, inputs) -> dict[str, Any]:
    """One backend in one dtype at one size against the fp32 math reference."""
    import torch

    row: dict[str, Any] = {"backend": backend, "dtype": dtype_name, "tokens": size}
    if dtype_name == "float32" and backend != "sdpa":
        return dict(row, status="n/a", detail="bf16/fp16 kernel")
    missing = unavailable(backend)
    if missing:
        return dict(row, status="skipped", detail=missing.splitlines()[0][:160])
    dtype = getattr(torch, dtype_name)
    q, k, v, cu, max_len, go = inputs
    low = [x.to(dtype) for x in (q, k, v)]
    try:
        base = attention_run("sdpa", *low, cu, max_len, go.to(dtype)) if dtype != torch.float32 else ref
        with _no_math():
            got, ms = _timed(lambda: attention_run(backend, *low, cu, max_len, go.to(dtype)))
    except Exception as e:  # noqa: BLE001 - the row says what broke; the matrix goes on
        return dict(row, status="error", detail=f"{type(e).__name__}: {e}"[:200])
    fwd, fwd_ref = max_err(got[0], ref[0]), max_err(base[0], ref[0])
    grad = max(max_err(a, b) for a, b in zip(got[1:], ref[1:]))
    grad_ref = max(max_err(a, b) for a, b in zip(base[1:], ref[1:]))
    ok = passes(fwd, fwd_ref) and passes(grad, grad_ref)
    return dict(row, status="pass" if ok else "FAIL", fwd_err=fwd, grad_err=grad, ms=round(ms, 1))


def attention_matrix(device: str = "cuda", docs_by_size: dict[str, tuple[int, ...]] = DOCS) -> dict[str, Any]:
    """Every backend x {fp32, bf16} x {4K, 32K} against SDPA-math in fp32 (forward and backward).

    ``device``/``docs_by_size`` let the tests run the same code on the CPU with tiny documents.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for size, docs in docs_by_size.items():
        inputs = _inputs(docs, device)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = attention_run("sdpa", *inputs[:3], inputs[3], inputs[4], inputs[5])
        for backend in ("sdpa", "flash", "te"):
            for dtype_name in ("float32", "bfloat16"):
                rows.append(_matrix_row(backend, dtype_name, size, ref, inputs))
        del ref, inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    detail = ", ".join(f"{r['backend']} {r['dtype']} {r['tokens']}: {r['status']}" for r in bad)
    return {"status": "FAIL" if bad else "pass", "detail": detail, "rows": rows}


def te_rebuild() -> dict[str, Any]:
    """Per new packed shape: TE attention's first forward+backward against a repeat of the same shape."""
    import torch

    missing = unavailable("te")
    if missing:
        return {"status": "skipped", "detail": missing.splitlines()[0][:200], "rows": []}
    rows = []
    warm = _inputs((256, 256))
    bf = [x.to(torch.bfloat16) for x in (warm[0], warm[1], warm[2])]
    attention_run("te", *bf, warm[3], warm[4], warm[5].to(torch.bfloat16))  # module and library set-up
    for docs in TE_SHAPES:
        q, k, v, cu, max_len, go = _inputs(docs)
        args = [x.to(torch.bfloat16) for x in (q, k, v)]
        run = functools.partial(attention_run, "te", *args, cu, max_len, go.to(torch.bfloat16))
        _, first = _timed(run)
        _, again = _timed(run)
        rows.append({"tokens": sum(docs), "docs": len(docs), "first_ms": round(first, 1), "repeat_ms": round(again, 1)})
    extra = sorted(r["first_ms"] - r["repeat_ms"] for r in rows)
    detail = f"per new shape: median {extra[len(extra) // 2]:.1f} ms over a repeat (max {extra[-1]:.1f} ms)"
    return {"status": "pass", "detail": detail, "rows": rows}


STAGES = {"attention-matrix": attention_matrix, "te-rebuild": te_rebuild}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--result", required=True, help="JSON file this stage writes")
    a = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    res = STAGES[a.stage]()
    Path(a.result).write_text(json.dumps(res, default=str))
    return 0 if res["status"] in ("pass", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
