"""Forward+backward time and all-to-all share of one transformer layer per SP degree.

Why: the planner's cost model predicts compute and all-to-all time per group from profiled
coefficients; this measures them on the real runtime (FlexSPCoreAttention inside a small
pre-norm transformer layer with GQA and SwiGLU), so the two can be compared.

On ``--world-size`` ranks (default 4, gloo), for each degree d every aligned block of d ranks
forms a group and all groups run at once, each holding ``tokens`` packed tokens (``--docs``
equal documents). Per (degree, tokens) the table shows the median over repeats of the slowest
rank's forward / backward ms, the mean all-to-all ms per rank and its share, the all-to-all
volume per token (measured, and the cost model's formula for one layer), and the effective
bandwidth in the cost model's units (``bytes_per_token * T / d / 2^20 / ms``).

    python benchmarks/runtime_bench.py                      # 4 gloo ranks on CPU
    python benchmarks/runtime_bench.py --tokens 2048 8192 --docs 4
    python benchmarks/runtime_bench.py --backend nccl --dtype bfloat16 --attn-backend flash  # >= 4 GPUs
    python benchmarks/runtime_bench.py --check-backends     # one GPU: sdpa/flash/te parity vs fp64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field, fields

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests.dist_utils


@dataclass
class BenchConfig:
    world_size: int = 4
    degrees: list[int] = field(default_factory=lambda: [1, 2, 4])
    tokens: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    docs: int = 1
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 512
    repeats: int = 3
    warmup: int = 1
    backend: str = "gloo"
    attn_backend: str = "sdpa"
    dtype: str = "float32"
    threads: int = 1
    timeout_s: float = 900.0


def _build_layer(cfg: BenchConfig, device, dtype):
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention

    d = cfg.hidden // cfg.heads
    tcfg = TransformerConfig(
        num_layers=1,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.heads,
        num_query_groups=cfg.kv_heads,
        kv_channels=d,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )

    class Layer(torch.nn.Module):
        """Pre-norm block: RMSNorm, QKV (GQA), FlexSP attention, proj; RMSNorm, SwiGLU MLP."""

        def __init__(self):
            super().__init__()
            self.norm1 = torch.nn.RMSNorm(cfg.hidden)
            self.qkv = torch.nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * d, bias=False)
            self.attn = FlexSPCoreAttention(tcfg, 1, AttnMaskType.causal, "self", backend=cfg.attn_backend)
            self.proj = torch.nn.Linear(cfg.heads * d, cfg.hidden, bias=False)
            self.norm2 = torch.nn.RMSNorm(cfg.hidden)
            self.fc1 = torch.nn.Linear(cfg.hidden, 2 * cfg.ffn, bias=False)
            self.fc2 = torch.nn.Linear(cfg.ffn, cfg.hidden, bias=False)

        def forward(self, x, packed_seq_params):
            s = x.shape[0]
            q, k, v = self.qkv(self.norm1(x)).view(s, 1, -1, d).split([cfg.heads, cfg.kv_heads, cfg.kv_heads], dim=2)
            x = x + self.proj(self.attn(q, k, v, None, packed_seq_params=packed_seq_params))
            a, b = self.fc1(self.norm2(x)).chunk(2, dim=-1)
            return x + self.fc2(torch.nn.functional.silu(a) * b)

    torch.manual_seed(1234)
    return Layer().to(device=device, dtype=dtype)


def _rank_body(rank: int, world_size: int, cfg_dict: dict) -> list[dict]:
    import time

    import torch
    import torch.distributed as dist

    from megatron.flexsp.runtime.alltoall import get_stats
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.packing import pack_group
    from megatron.flexsp.runtime.sp_group import packed_seq_params, sp_group

    cfg = BenchConfig(**cfg_dict)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.backend == "nccl" else torch.device("cpu")
    dtype = getattr(torch, cfg.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    groups = [tuple(range(b, b + d)) for d in cfg.degrees for b in range(0, world_size, d)]
    pool = GroupPool(groups)
    layer = _build_layer(cfg, device, dtype)
    stats = get_stats()
    rows = []
    for d in cfg.degrees:
        ranks = tuple(range(rank // d * d, rank // d * d + d))
        me = ranks.index(rank)
        for tokens in cfg.tokens:
            base, extra = divmod(tokens, cfg.docs)
            docs = [torch.zeros(base + (i < extra) + 1, dtype=torch.long) for i in range(cfg.docs)]
            packed = pack_group(docs, me, d)
            with sp_group(pool, ranks) as active:  # the group travels with the data
                psp = packed_seq_params(packed, active, device)
            x = torch.randn(packed.n_local, 1, cfg.hidden, device=device, dtype=dtype)
            fwd, bwd, a2a = [], [], []
            for it in range(cfg.warmup + cfg.repeats):
                layer.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_(True)
                dist.barrier()
                sync()
                stats.reset()
                with sp_group(pool, ranks):
                    t0 = time.perf_counter()
                    out = layer(xi, psp)
                    sync()
                    t1 = time.perf_counter()
                    out.float().square().mean().backward()
                    sync()
                    t2 = time.perf_counter()
                if it >= cfg.warmup:
                    fwd.append((t1 - t0) * 1e3)
                    bwd.append((t2 - t1) * 1e3)
                    a2a.append(stats.ms)
            rows.append(
                dict(
                    degree=d,
                    tokens=tokens,
                    tokens_per_rank=packed.n_local,
                    fwd=fwd,
                    bwd=bwd,
                    a2a=a2a,
                    a2a_bytes=stats.bytes,
                    a2a_calls=stats.calls,
                    padded=packed.num_padded,
                )
            )
    return rows


def _summarise(cfg: BenchConfig, per_rank: list[list[dict]]) -> list[dict]:
    from megatron.flexsp.planner.costmodel import alltoall_bytes_per_token

    elem = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[cfg.dtype]
    formula = alltoall_bytes_per_token(1, cfg.hidden, cfg.heads, cfg.kv_heads, elem)
    out = []
    for i, row in enumerate(per_rank[0]):
        rows = [r[i] for r in per_rank]
        n = len(row["fwd"])
        fwd = statistics.median(max(r["fwd"][k] for r in rows) for k in range(n))
        bwd = statistics.median(max(r["bwd"][k] for r in rows) for k in range(n))
        total = statistics.median(max(r["fwd"][k] + r["bwd"][k] for r in rows) for k in range(n))
        a2a = statistics.median(statistics.mean(r["a2a"][k] for r in rows) for k in range(n))
        d, T = row["degree"], row["tokens"] + row["padded"]
        bpt = row["a2a_bytes"] * d / T if d > 1 else 0.0  # per token of the group, fwd + bwd
        out.append(
            dict(
                degree=d,
                tokens=row["tokens"],
                tokens_per_rank=row["tokens_per_rank"],
                fwd_ms=fwd,
                bwd_ms=bwd,
                fwd_bwd_ms=total,
                a2a_ms=a2a,
                a2a_share=a2a / total if total else 0.0,
                a2a_calls=row["a2a_calls"],
                a2a_mb_per_rank=row["a2a_bytes"] / 2**20,
                bytes_per_token=bpt,
                formula_bytes_per_token=formula if d > 1 else 0.0,
                eff_bandwidth_gbs=(row["a2a_bytes"] / 2**20 / a2a) if d > 1 and a2a > 0 else None,
            )
        )
    return out


def _table(rows: list[dict], cfg: BenchConfig) -> str:
    head = (
        f"FlexSP runtime bench: {cfg.world_size} ranks ({cfg.backend}), layer hidden={cfg.hidden} "
        f"heads={cfg.heads} kv_heads={cfg.kv_heads} ffn={cfg.ffn} {cfg.dtype}, attention={cfg.attn_backend}, "
        f"{cfg.docs} doc(s)/group, median of {cfg.repeats}"
    )
    cols = [
        "degree",
        "tokens",
        "tok/rank",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "a2a ms",
        "a2a %",
        "a2a calls",
        "B/token",
        "model B/token",
        "eff GB/s",
    ]
    lines = [head, " | ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        bw = "-" if r["eff_bandwidth_gbs"] is None else f"{r['eff_bandwidth_gbs']:.3f}"
        vals = [
            r["degree"],
            r["tokens"],
            r["tokens_per_rank"],
            f"{r['fwd_ms']:.1f}",
            f"{r['bwd_ms']:.1f}",
            f"{r['fwd_bwd_ms']:.1f}",
            f"{r['a2a_ms']:.1f}",
            f"{100 * r['a2a_share']:.1f}",
            r["a2a_calls"],
            f"{r['bytes_per_token']:.0f}",
            f"{r['formula_bytes_per_token']:.0f}",
            bw,
        ]
        lines.append(" | ".join(f"{v:>10}" for v in vals))
    lines.append(
        "B/token: all-to-all bytes per token of the group through this layer, forward + backward; "
        "model B/token: costmodel.alltoall_bytes_per_token for one layer (differs when kv heads are "
        "replicated because the degree exceeds them)."
    )
    return "\n".join(lines)


def check_backends(device: str | None = None, dtype_name: str | None = None, lengths=(1, 300, 7, 2000, 45)) -> int:
    """Single-process parity of every available attention backend against fp64 SDPA.

    For a GPU node: flash-attn and Transformer Engine get the packed documents in bf16 and
    must match the reference (outputs and q/k/v gradients) within bf16 tolerance. Returns the
    number of failing backends (the exit code of ``--check-backends``).
    """
    import time

    import torch

    from megatron.flexsp.runtime import attention as A

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype_name) if dtype_name else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    g = torch.Generator().manual_seed(0)
    T, h, hk, d = sum(lengths), 8, 2, 64
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)
    base = [torch.randn(T, n, d, generator=g, dtype=torch.float64) for n in (h, hk, hk)]
    gout = torch.randn(T, h, d, generator=g, dtype=torch.float64)

    def run(backend, dt, device_):
        q, k, v = (x.detach().to(device_, dt).clone().requires_grad_(True) for x in base)
        te_mod = None
        if backend == "te":
            te = A._require("te")
            te_mod = te.DotProductAttention(
                num_attention_heads=h,
                kv_channels=d,
                num_gqa_groups=hk,
                attention_dropout=0.0,
                qkv_format="thd",
                attn_mask_type="padding_causal",
                softmax_scale=d**-0.5,
            )
        t0 = time.perf_counter()
        out = A.varlen_causal_attention(q, k, v, cu, max(lengths), backend=backend, te_module=te_mod)
        out.backward(gout.to(device_, dt))
        if device_.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        return [t.detach().double().cpu() for t in (out, q.grad, k.grad, v.grad)], ms

    ref, _ = run("sdpa", torch.float64, torch.device("cpu"))
    failures = 0
    print(
        f"attention backend parity on {dev} in {dtype} vs fp64 sdpa; documents {list(lengths)}; "
        f"heads {h}/{hk} kv, dim {d}; tolerance {tol} (relative to max |ref|)"
    )
    for backend in ("sdpa", "flash", "te"):
        try:
            if backend != "sdpa":
                A._require(backend)
        except ImportError as e:
            print(f"{backend:>6}: not available ({str(e).split(';')[0]})")
            continue
        if backend != "sdpa" and dev.type != "cuda":
            print(f"{backend:>6}: skipped (needs CUDA)")
            continue
        try:
            got, ms = run(backend, dtype, dev)
        except Exception as e:  # noqa: BLE001 - report and count, keep checking the others
            print(f"{backend:>6}: FAILED to run: {type(e).__name__}: {e}")
            failures += 1
            continue
        errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]
        ok = all(e <= tol for e in errs)
        failures += not ok
        print(
            f"{backend:>6}: {'ok  ' if ok else 'FAIL'} rel err out {errs[0]:.2e} dq {errs[1]:.2e} "
            f"dk {errs[2]:.2e} dv {errs[3]:.2e}; fwd+bwd {ms:.1f} ms"
        )
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    c = BenchConfig()
    p.add_argument("--world-size", type=int, default=c.world_size)
    p.add_argument("--degrees", type=int, nargs="+", default=c.degrees)
    p.add_argument("--tokens", type=int, nargs="+", default=c.tokens, help="packed tokens per group")
    p.add_argument("--docs", type=int, default=c.docs, help="equal documents per group")
    p.add_argument("--hidden", type=int, default=c.hidden)
    p.add_argument("--heads", type=int, default=c.heads)
    p.add_argument("--kv-heads", type=int, default=c.kv_heads)
    p.add_argument("--ffn", type=int, default=c.ffn)
    p.add_argument("--repeats", type=int, default=c.repeats)
    p.add_argument("--warmup", type=int, default=c.warmup)
    p.add_argument("--backend", choices=["gloo", "nccl"], default=c.backend)
    p.add_argument("--attn-backend", choices=["sdpa", "flash", "te", "auto"], default=c.attn_backend)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=c.dtype)
    p.add_argument("--threads", type=int, default=c.threads, help="torch threads per rank")
    p.add_argument("--timeout-s", type=float, default=c.timeout_s)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument(
        "--check-backends",
        action="store_true",
        help="instead: single-process parity of the sdpa/flash/te attention backends on this device",
    )
    a = p.parse_args(argv)
    if a.check_backends:
        return min(1, check_backends(dtype_name=None if a.dtype == "float32" else a.dtype))
    cfg = BenchConfig(**{f.name: getattr(a, f.name) for f in fields(BenchConfig)})  # one flag per field
    bad = [d for d in cfg.degrees if cfg.world_size % d or cfg.heads % d]
    if bad:
        p.error(f"degrees {bad} must divide the world size {cfg.world_size} and the heads {cfg.heads}")
    if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")

    from tests.dist_utils import run_distributed

    per_rank = run_distributed(
        _rank_body, cfg.world_size, asdict(cfg), timeout=cfg.timeout_s, backend=cfg.backend, threads=cfg.threads
    )
    rows = _summarise(cfg, per_rank)
    print(_table(rows, cfg))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": asdict(cfg), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
