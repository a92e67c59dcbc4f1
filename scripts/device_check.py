"""Single-GPU check of the cluster code paths (run by scripts/device_check.sh, at most 8 minutes).

1. Attention: FlexSPCoreAttention (the module the GPT layers use) with the Transformer Engine
   and flash-attn varlen backends against the SDPA backend, forward and backward, bf16, on
   packed documents of very different lengths with GQA. Reference: SDPA in fp32; a kernel
   passes when its bf16 error is at most 2x SDPA-in-bf16's own error plus a small floor
   (the usual way to judge low-precision attention kernels).
2. attention-matrix: every backend against SDPA-math, fp32 and bf16, GQA, 4K and 32K tokens;
   te-rebuild: TE attention's set-up time per new packed shape (device_check_stages.py).
3. Profiler: flexsp-profile on this GPU (world size 1) for the small GPT used below; prints the
   fitted cost model.
4. Training: a timed 2-layer run of pretrain_gpt_flexsp.py (FSDP2, the default sharding) with
   each available backend (same data, same initial weights): losses must be finite and agree
   across backends within bf16 noise; fsdp2-vs-ddp: the same run replicated (DDP) must start
   from the same loss. recompute: the same sdpa run with --recompute-granularity full, and
   selective (--recompute-modules mlp): the first loss equals the run without (the forward is
   the same computation), and the table gives each mode's ms/iter next to none's.

The first table lists every stage with its status: pass, FAIL, error, TIMEOUT (the stage ran
past its time limit and was stopped), skipped (with why: no GPU, a package missing, no time
left, not implemented) or not installed. Without a GPU (``--device cpu``) only the CPU attention
check runs and every GPU stage is listed as skipped.

Prints the tables and writes, under --out (default $OUT, else outputs/device-check-<time>),
stages.jsonl (a line per stage as it finishes), device_check.txt / .json (rewritten after every
stage; ``complete`` is false until the end), cost_model.json and the logs. The whole run plans
within --budget-s (later stages get what is left; a stage with too little left is "skipped").
Stage processes stay in this process group (no new session) so an outer `timeout` reaches them;
a stage past its limit, or a TERM/INT/HUP to this process, kills the stage's process tree and
writes the partial report. Exit codes: 0 all checks passed (skips allowed), 1 a check failed, 3 no NVIDIA GPU here
(nothing was run), 4 no failure but a stage timed out, 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # megatron.flexsp (namespace portion of this checkout)

from megatron.flexsp.launching import TIMED_OUT, run_bounded  # noqa: E402

NO_GPU_EXIT = 3
TIMEOUT_EXIT = 4


@dataclass
class AttentionResult:
    backend: str
    status: str  # pass, FAIL, not installed, error
    fwd_err: float = float("nan")
    fwd_ref_err: float = float("nan")
    grad_err: float = float("nan")
    grad_ref_err: float = float("nan")
    ms: float = float("nan")
    detail: str = ""


@dataclass
class TrainResult:
    backend: str
    status: str
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = float("nan")
    iter_ms: float = float("nan")
    detail: str = ""


@dataclass
class StageResult:
    """A stage reported by status and a one-line why (plus its own rows, e.g. the attention matrix)."""

    stage: str
    status: str  # pass, FAIL, error, TIMEOUT, skipped
    detail: str = ""
    rows: list[dict] = field(default_factory=list)


def max_err(x, ref) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def passes(err: float, ref_err: float, floor: float = 1e-3) -> bool:
    """bf16 kernel error within twice the bf16 SDPA error (plus a floor for exact-ish kernels)."""
    return math.isfinite(err) and err <= 2.0 * ref_err + floor


def unavailable(backend: str) -> str:
    """Why ``backend`` cannot run here ('' when it can): the package to install and the import error."""
    from megatron.flexsp.runtime.attention import _require, backend_importable

    if backend_importable(backend):
        return ""
    try:
        _require(backend)
    except ImportError as e:
        return str(e)[:300]
    return ""


def attention_run(backend: str, q, k, v, cu, max_len: int, grad_out):
    """FlexSPCoreAttention forward + backward at degree 1; returns (out, dq, dk, dv)."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention

    total, heads, dim = q.shape
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=k.shape[1],
        kv_channels=dim,
        attention_dropout=0.0,
        bf16=q.dtype == torch.bfloat16,
        params_dtype=q.dtype,
    )
    mod = FlexSPCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, backend=backend)
    qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )
    out = mod(qq.unsqueeze(1), kk.unsqueeze(1), vv.unsqueeze(1), None, packed_seq_params=psp)
    out = out.view(total, heads, dim)
    out.backward(grad_out)
    return out.detach(), qq.grad, kk.grad, vv.grad


def attention_check(
    backend: str,
    *,
    device: str = "cuda",
    doc_lengths: Sequence[int] = (1, 17, 300, 1024, 2048, 77),
    heads: int = 16,
    kv_heads: int = 4,
    dim: int = 128,
    dtype_name: str = "bfloat16",
    seed: int = 0,
) -> AttentionResult:
    """One backend against SDPA (fp32 reference; SDPA in the same dtype gives the error budget)."""
    import torch

    missing = unavailable(backend)
    if missing:
        return AttentionResult(backend, "not installed", detail=missing)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(doc_lengths)
    q = torch.randn(total, heads, dim, generator=g).to(device)
    k = torch.randn(total, kv_heads, dim, generator=g).to(device)
    v = torch.randn(total, kv_heads, dim, generator=g).to(device)
    go = torch.randn(total, heads, dim, generator=g).to(device)
    cu = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    max_len = max(doc_lengths)
    try:
        ref = attention_run("sdpa", q, k, v, cu, max_len, go)  # fp32 reference
        low = [x.to(dtype) for x in (q, k, v)]
        base = attention_run("sdpa", *low, cu, max_len, go.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = attention_run(backend, *low, cu, max_len, go.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
    except Exception as e:  # noqa: BLE001 - reported in the table, the check goes on
        return AttentionResult(backend, "error", detail=f"{type(e).__name__}: {e}"[:300])
    fwd, fwd_ref = max_err(got[0], ref[0]), max_err(base[0], ref[0])
    grad = max(max_err(a, b) for a, b in zip(got[1:], ref[1:]))
    grad_ref = max(max_err(a, b) for a, b in zip(base[1:], ref[1:]))
    ok = passes(fwd, fwd_ref) and passes(grad, grad_ref)
    return AttentionResult(backend, "pass" if ok else "FAIL", fwd, fwd_ref, grad, grad_ref, ms)


# ------------------------------------------------------------------------ subprocess stages
# Stage children stay in this process group and session (no setsid), so the outer `timeout` of
# device_check.sh and any job killer reach them; a stage that runs past its own limit, or this
# process being stopped (Interrupted, raised while run_bounded waits), kills the stage's whole tree.


class Interrupted(BaseException):
    """A termination signal arrived (the outer timeout, Ctrl-C, a job killer). A BaseException,
    like KeyboardInterrupt, so the stages' ``except Exception`` (a failing kernel is reported, not
    fatal) cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    # The same signal often comes twice (from the shell's trap and relayed by `timeout`): take
    # the first, ignore the rest, so writing the partial report is not interrupted itself.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    r = run_bounded(cmd, timeout, log=log, cwd=ROOT, new_session=False)
    if r.timed_out:
        return TIMED_OUT, f"timed out after {timeout:.0f}s"
    rc = r.returncode
    # Orphans of a finished stage (reparented away from it) stay in this process group, where
    # device_check.sh's exit trap ends them.
    tail = [x for x in log.read_text().splitlines() if "Warning" not in x and "warn(" not in x]
    return rc, "\n".join(tail[-12:])


MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "1024",
    "--num-attention-heads",
    "16",
    "--group-query-attention",
    "--num-query-groups",
    "4",
    "--swiglu",
    "--seq-length",
    "8192",
    "--seed",
    "1234",
]


def profile_stage(out: Path, timeout: float) -> tuple[str, str]:
    cmd = [
        sys.executable,
        "-m",
        "megatron.flexsp.training.profiler",
        *MODEL,
        "--bf16",
        "--profile-repeats",
        "3",
        "--profile-warmup",
        "1",
        "--output",
        str(out / "cost_model.json"),
    ]
    rc, tail = _run(cmd, out / "profile.log", timeout)
    text = (out / "profile.log").read_text()
    summary = "\n".join(x for x in text.splitlines() if x.startswith(("compute fit", "  ", "memory (", "[flexsp")))
    return _status(rc), (summary if rc == 0 else tail)


def train_stage(
    backend: str,
    out: Path,
    cost_model: str,
    timeout: float,
    iters: int,
    sharding: str = "fsdp2",
    extra: tuple[str, ...] = (),
    label: str = "",
) -> TrainResult:
    """A timed run of the 2-layer model with one attention backend and one model-state sharding."""
    name = (backend if sharding == "fsdp2" else f"{backend}-{sharding}") + (f"-{label}" if label else "")
    missing = unavailable(backend)
    if missing:
        return TrainResult(name, "not installed", detail=missing)
    metrics = out / f"train-{name}.jsonl"
    metrics.unlink(missing_ok=True)
    impl = ["--transformer-impl", "transformer_engine"] if backend == "te" else []
    cmd = [
        sys.executable,
        str(ROOT / "pretrain_gpt_flexsp.py"),
        *MODEL,
        "--bf16",
        "--mock-data",
        "--global-batch-size",
        "16",
        "--train-iters",
        str(iters),
        "--lr",
        "3e-4",
        "--log-interval",
        "1",
        "--no-progress-bar",
        "--attention-backend",
        backend,
        *impl,
        "--flexsp-cost-model",
        cost_model,
        "--metrics-file",
        str(metrics),
        "--flexsp-sharding",
        sharding,
        *extra,
    ]
    rc, tail = _run(cmd, out / f"train-{name}.log", timeout)
    if rc != 0 or not metrics.exists():
        return TrainResult(name, _status(rc) if rc != 0 else "FAIL", detail=tail)
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in recs]
    use = recs[1:] or recs
    ms = sum(r["iter_ms"] for r in use)
    tps = sum(r["tokens"] for r in use) / (ms / 1e3)
    ok = len(losses) == iters and all(math.isfinite(x) for x in losses)
    return TrainResult(name, "pass" if ok else "FAIL", losses, tps, ms / len(use), "" if ok else f"losses {losses}")


def _status(rc: int) -> str:
    """A subprocess stage's status from its exit code: stopped at its time limit is TIMEOUT, not FAIL."""
    return "pass" if rc == 0 else "TIMEOUT" if rc == TIMED_OUT else "FAIL"


def format_stages(rows: list[dict]) -> list[str]:
    """THE table: every stage, its status, its seconds and why (skips and timeouts say so)."""
    lines = [f"  {'stage':<16}{'status':<15}{'s':>6}  detail"]
    for r in rows:
        detail = (r.get("detail") or "").strip().splitlines()
        lines.append(f"  {r['stage']:<16}{r['status']:<15}{r['seconds']:>6.0f}  {detail[-1][:110] if detail else ''}")
    return lines


def format_rows(stage: StageResult) -> list[str]:
    """A stage's own rows (attention matrix, TE rebuild times), one line each."""
    lines = ["", f"{stage.stage}: {stage.status}" + (f" ({stage.detail})" if stage.detail else "")]
    for r in stage.rows:
        lines.append("  " + "  ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return lines


def format_report(
    attn: list[AttentionResult],
    prof: tuple[str, str] | None,
    train: list[TrainResult],
    gpu: str,
    rows: list[dict] | None = None,
    stages: list[StageResult] | None = None,
) -> str:
    lines = [f"device check on {gpu}", ""]
    if rows:
        lines += ["stages", *format_stages(rows), ""]
    lines += [
        "attention vs SDPA (fp32 reference; bf16; max error relative to max |ref|)",
        f"  {'backend':<8}{'status':<15}{'fwd err':>10}{'sdpa bf16':>11}{'grad err':>10}{'sdpa bf16':>11}{'ms':>9}",
    ]
    for a in attn:
        lines.append(
            f"  {a.backend:<8}{a.status:<15}{a.fwd_err:>10.2e}{a.fwd_ref_err:>11.2e}{a.grad_err:>10.2e}"
            f"{a.grad_ref_err:>11.2e}{a.ms:>9.1f}" + (f"  {a.detail}" if a.detail else "")
        )
    for st in stages or []:
        if st.rows:
            lines += format_rows(st)
    if prof is not None:
        lines += ["", f"profiler: {prof[0]}", *("  " + x for x in prof[1].splitlines())]
    if train:
        lines += [
            "",
            "training (2 layers, hidden 1024, bf16, mock long-tail data, 1 GPU)",
            f"  {'backend':<8}{'status':<15}{'first loss':>11}{'last loss':>11}{'ms/iter':>10}{'tokens/s':>11}",
        ]
        for t in train:
            first = f"{t.losses[0]:.4f}" if t.losses else "-"
            last = f"{t.losses[-1]:.4f}" if t.losses else "-"
            lines.append(
                f"  {t.backend:<8}{t.status:<15}{first:>11}{last:>11}{t.iter_ms:>10.1f}{t.tokens_per_s:>11.0f}"
                + (f"  {t.detail.splitlines()[-1] if t.detail else ''}" if t.status != "pass" else "")
            )
    return "\n".join(lines)


class Report:
    """The results so far, written to disk after every stage: a run that is cut short (time
    budget, signal, crash of a later stage) still leaves the table of what it finished.

    Files under ``out``: stages.jsonl (one line per finished stage, appended as it finishes),
    device_check.txt (the table) and device_check.json (``complete`` false until the end).
    """

    def __init__(self, out: Path, gpu: str):
        self.out, self.gpu, self.t0 = out, gpu, time.perf_counter()
        self.attn: list[AttentionResult] = []
        self.prof: tuple[str, str] | None = None
        self.train: list[TrainResult] = []
        self.stages: list[StageResult] = []  # the stages reported only by status (and their rows)
        self.rows: list[dict] = []  # THE table: every stage as it ends
        self.notes: list[str] = []
        self._last = 0.0
        (out / "stages.jsonl").write_text("")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage_done(self, stage: str, result: Any) -> None:
        rec = {
            "stage": stage,
            "seconds": round(self.elapsed(), 1),
            "result": asdict(result) if hasattr(result, "__dataclass_fields__") else result,
        }
        with open(self.out / "stages.jsonl", "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        status = result.status if hasattr(result, "status") else result[0]
        detail = result.detail if hasattr(result, "detail") else result[1]
        if isinstance(result, StageResult):
            self.stages.append(result)
        self.rows.append(
            {"stage": stage, "status": status, "seconds": self.elapsed() - self._last, "detail": detail or ""}
        )
        self._last = self.elapsed()
        print(f"[device_check] {stage}: {status} ({self.elapsed():.0f}s)", flush=True)
        self.write(complete=False)

    def failed(self) -> list[str]:
        return (
            [x.backend for x in self.attn if x.status in ("FAIL", "error")]
            + [f"train-{x.backend}" for x in self.train if x.status == "FAIL"]
            + (["profiler"] if self.prof and self.prof[0] == "FAIL" else [])
            + [x.stage for x in self.stages if x.status in ("FAIL", "error")]
        )

    def timed_out(self) -> list[str]:
        return [r["stage"] for r in self.rows if r["status"] == "TIMEOUT"]

    def write(self, complete: bool) -> str:
        text = format_report(self.attn, self.prof, self.train, self.gpu, self.rows, self.stages)
        if self.notes:
            text += "\n\n" + "\n".join(f"note: {n}" for n in self.notes)
        if not complete:
            text += f"\n\n(incomplete: {self.elapsed():.0f}s so far)"
        (self.out / "device_check.txt").write_text(text + "\n")
        (self.out / "device_check.json").write_text(
            json.dumps(
                {
                    "gpu": self.gpu,
                    "complete": complete,
                    "attention": [asdict(x) for x in self.attn],
                    "profile": self.prof,
                    "train": [asdict(x) for x in self.train],
                    "stages": self.rows,
                    "stage_rows": {x.stage: x.rows for x in self.stages},
                    "notes": self.notes,
                    "seconds": self.elapsed(),
                },
                indent=2,
                default=str,
            )
        )
        return text


FALLBACK_COST_MODEL = {
    "name": "device-check fallback",
    "num_layers": 2,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_query_groups": 4,
    "gpus_per_node": 1,
    "compute": {"alpha1_ms_per_token2": 1e-7, "alpha2_ms_per_token": 1e-3, "beta1_ms": 5.0},
    "alltoall": {"bytes_per_token": 65536, "bandwidth_gbs": {"2": 100.0}},
    "memory": {"limit_gb": 60, "model_states_mb": 2000, "activation_mb_per_token": 1.0},
}


NO_GPU = "needs a CUDA GPU (--device cpu)"
NO_TIME = "time budget spent"


def gpu_stage(name: str, out: Path, timeout: float) -> StageResult:
    """One stage of device_check_stages.py in its own process, stopped at ``timeout`` (TIMEOUT)."""
    result = out / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "device_check_stages.py"), name, "--result", str(result)]
    rc, tail = _run(cmd, out / f"{name}.log", timeout)
    if result.exists():
        data = json.loads(result.read_text())
        return StageResult(name, data["status"], data.get("detail", ""), data.get("rows", []))
    return StageResult(name, _status(rc) if rc else "FAIL", tail)


def _attention_stages(a: argparse.Namespace, rep: Report) -> None:
    lengths = tuple(int(x) for x in a.doc_lengths.split(","))
    for b in ("sdpa", "flash", "te"):
        rep.attn.append(attention_check(b, device=a.device, doc_lengths=lengths))
        rep.stage_done(f"attention-{b}", rep.attn[-1])


def _kernel_stages(a: argparse.Namespace, rep: Report, limit) -> None:
    """The attention matrix and TE's per-shape rebuild time, each in a bounded process."""
    for name in ("attention-matrix", "te-rebuild"):
        if a.device != "cuda":
            res = StageResult(name, "skipped", NO_GPU)
        elif limit() < 30:
            res = StageResult(name, "skipped", NO_TIME)
        else:
            res = gpu_stage(name, rep.out, limit())
        rep.stage_done(name, res)


def _profile_stage(a: argparse.Namespace, rep: Report, limit) -> str:
    """The profiler on this GPU; returns the fitted cost model's path ('' when none)."""
    if a.skip_profile:
        return ""
    why = NO_GPU if a.device != "cuda" else NO_TIME if limit() < 30 else ""
    rep.prof = ("skipped", why) if why else profile_stage(rep.out, limit())
    rep.stage_done("profile", rep.prof)
    return str(rep.out / "cost_model.json") if rep.prof[0] == "pass" else ""


def _train_stages(a: argparse.Namespace, rep: Report, limit, cost: str) -> None:
    """Timed 2-layer runs (FSDP2) per backend, FSDP2 against DDP, and full / selective recomputation."""
    if not cost:  # no profile: a cost model for this model shape that fits one GPU
        cost = str(rep.out / "cost_model_fallback.json")
        Path(cost).write_text(json.dumps(FALLBACK_COST_MODEL))
    for b in ("sdpa", "flash", "te"):
        why = NO_GPU if a.device != "cuda" else NO_TIME if limit() < 30 else ""
        res = TrainResult(b, "skipped", detail=why) if why else train_stage(b, rep.out, cost, limit(), a.train_iters)
        rep.train.append(res)
        rep.stage_done(f"train-{b}", res)
    _check_first_losses(rep.train)
    why = NO_GPU if a.device != "cuda" else NO_TIME if limit() < 30 else ""
    rep.stage_done(
        "fsdp2-vs-ddp", StageResult("fsdp2-vs-ddp", "skipped", why) if why else _ddp_check(a, rep, cost, limit)
    )
    why = NO_GPU if a.device != "cuda" else NO_TIME if limit() < 30 else ""
    rep.stage_done(
        "recompute", StageResult("recompute", "skipped", why) if why else _recompute_check(a, rep, cost, limit)
    )


def _check_first_losses(train: list[TrainResult]) -> None:
    """Same data and weights: the backends' first losses agree within bf16 noise."""
    ran = [t for t in train if t.status == "pass"]
    for t in ran[1:]:
        l0 = ran[0].losses[0]
        if abs(t.losses[0] - l0) > 0.02 * abs(l0):
            t.status, t.detail = "FAIL", f"first loss {t.losses[0]:.4f} vs {ran[0].backend} {l0:.4f}"


def _ddp_check(a: argparse.Namespace, rep: Report, cost: str, limit) -> StageResult:
    """FSDP2 on one GPU against the replicated (DDP) model: the same first loss."""
    fsdp = next((t for t in rep.train if t.backend == "sdpa" and t.status == "pass"), None)
    if fsdp is None:
        return StageResult("fsdp2-vs-ddp", "skipped", "the FSDP2 sdpa run did not pass")
    ddp = train_stage("sdpa", rep.out, cost, limit(), a.train_iters, sharding="ddp")
    if ddp.status != "pass":
        return StageResult("fsdp2-vs-ddp", ddp.status, ddp.detail)
    f0, d0 = fsdp.losses[0], ddp.losses[0]
    ok = abs(f0 - d0) <= 0.02 * abs(d0)
    detail = f"first loss fsdp2 {f0:.4f} ddp {d0:.4f}; ms/iter fsdp2 {fsdp.iter_ms:.0f} ddp {ddp.iter_ms:.0f}"
    return StageResult("fsdp2-vs-ddp", "pass" if ok else "FAIL", detail)


RECOMPUTE_MODES = {
    "full": ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"),
    "selective": ("--recompute-granularity", "selective", "--recompute-modules", "mlp"),
}


def _recompute_check(a: argparse.Namespace, rep: Report, cost: str, limit) -> StageResult:
    """Full and selective recomputation on the GPU: the same first loss as none, and their ms/iter."""
    none = next((t for t in rep.train if t.backend == "sdpa" and t.status == "pass"), None)
    if none is None:
        return StageResult("recompute", "skipped", "the FSDP2 sdpa run did not pass")
    parts, status = [f"none {none.iter_ms:.0f} ms/iter"], "pass"
    for mode, flags in RECOMPUTE_MODES.items():
        if limit() < 30:
            return StageResult("recompute", "skipped", NO_TIME)
        res = train_stage("sdpa", rep.out, cost, limit(), a.train_iters, extra=flags, label=mode)
        if res.status != "pass":
            return StageResult("recompute", res.status, f"{mode}: {res.detail}")
        r0, n0 = res.losses[0], none.losses[0]
        if abs(r0 - n0) > 1e-3 * abs(n0):
            status = "FAIL"
        parts.append(f"{mode} {res.iter_ms:.0f} ms/iter ({res.iter_ms / none.iter_ms:.2f}x), first loss {r0:.4f}")
    parts.append(f"none's first loss {none.losses[0]:.4f}")
    return StageResult("recompute", status, "; ".join(parts))


def run_stages(a: argparse.Namespace, rep: Report, deadline: float) -> None:
    """Every stage in order, each recorded as it ends (a GPU stage without a GPU is skipped, named)."""
    import warnings

    warnings.filterwarnings("ignore")

    def limit() -> float:  # a subprocess stage may use what is left, up to its own cap
        return min(a.stage_timeout_s, deadline - time.monotonic() - 5.0)

    _attention_stages(a, rep)
    _kernel_stages(a, rep, limit)
    cost = _profile_stage(a, rep, limit)
    if not a.skip_train:
        _train_stages(a, rep, limit, cost)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or None)
    p.add_argument("--train-iters", type=int, default=4)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--stage-timeout-s", type=float, default=120, help="cap of one subprocess stage")
    p.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("DEVICE_CHECK_BUDGET_S", 460)),
        help="whole run; later stages get what is left (device_check.sh's timeout is the backstop)",
    )
    p.add_argument("--doc-lengths", default="1,17,300,1024,2048,77", help="packed documents of the attention stage")
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: the attention stage on the CPU, for testing this script without a GPU",
    )
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.budget_s

    import torch

    if a.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() == 0):
        print(
            "device_check: no NVIDIA GPU here (torch.cuda.is_available() is False): nothing was checked. Run "
            "scripts/device_check.sh on a machine with a CUDA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    out = Path(a.out or ROOT / "outputs" / f"device-check-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    gpu = (
        f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
        if a.device == "cuda"
        else f"cpu (torch {torch.__version__})"
    )
    rep = Report(out, gpu)
    rep.write(complete=False)
    saved = {sig: signal.signal(sig, _raise_interrupted) for sig in _STOP_SIGNALS}
    rc = 0
    try:
        run_stages(a, rep, deadline)
    except Interrupted as e:
        rep.notes.append(f"{e} after {rep.elapsed():.0f}s: stages not listed did not run")
        rc = 128 + e.signum
    except Exception as e:  # noqa: BLE001 - keep the table of the stages that finished
        rep.notes.append(f"stopped by {type(e).__name__}: {e}"[:400])
        rc = 1
    finally:
        if not rc:
            for sig, h in saved.items():
                signal.signal(sig, h)
    text = rep.write(complete=rc == 0)
    print(text)
    failed, late = rep.failed(), rep.timed_out()
    verdict = "FAILED: " + ", ".join(failed) if failed else "all checks passed" if rc == 0 else "stopped"
    if late:
        verdict += f"; TIMEOUT: {', '.join(late)}"
    print(f"[device_check] {verdict} in {rep.elapsed():.0f}s; outputs in {out}")
    return rc or (1 if failed else TIMEOUT_EXIT if late else 0)


if __name__ == "__main__":
    sys.exit(main())
