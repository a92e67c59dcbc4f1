"""Checkpoint cost on gloo ranks: peak RSS per rank during a save, how long training is blocked,
and the checkpoint's size, for the ``torch`` format (full state dicts gathered on rank 0) vs
``torch_dist`` (each rank writes its own FSDP2 shards) vs ``torch_dist --async-save`` (issue 18).

Why these three figures: a gather on rank 0 makes rank 0's memory grow with the whole model and
Adam state (at 8B parameters, ~96 GB of host memory on one process), and a synchronous save stalls
every rank for the whole write. Goals: rank 0's peak <= 1.15x the other ranks'; training blocked
by an asynchronous save <= 20% of the synchronous save's time.

Each format runs in fresh processes (a process's peak RSS never goes down, so modes must not share
one): every rank builds the GPT (FSDP2), takes one AdamW step so the optimizer state exists, then
saves while a thread samples its RSS every 2 ms. "blocked" is the time ``save`` kept the caller;
"write" is until the checkpoint is complete on disk (for --async-save, training steps overlap it:
the ranks run forward/backward steps until the background write is done).

    python benchmarks/checkpoint_bench.py                        # 4 ranks, 8 layers, hidden 1024
    python benchmarks/checkpoint_bench.py --layers 2 --hidden 256 # smoke setting
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("torch", "torch_dist", "torch_dist --async-save")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """Samples this process's resident set every ``period`` s while running (peak in MB)."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self._stop = period, _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.period)

    def __enter__(self) -> _PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _build(args: argparse.Namespace):
    """The GPT of the issue's measurement, sharded with FSDP2, after one AdamW step (optimizer state exists)."""
    import torch

    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.model import GPTConfig, build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model
    from megatron.flexsp.training.configs import OptimizerConfig
    from megatron.flexsp.training.optimizer import build_optimizer

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    cfg = GPTConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    model = shard_model(build_gpt_model(cfg, flexsp_attention=False), "fsdp2")  # stock attention: no SP group
    opt, sched = build_optimizer(model, OptimizerConfig(lr=1e-4, lr_warmup_iters=1, lr_decay_iters=10))
    step = _stepper(model, args)
    step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return model, opt, sched, step, torch


def _stepper(model, args: argparse.Namespace):
    """One forward/backward of a short sequence: the work an asynchronous save overlaps with."""
    import torch

    doc = torch.randint(0, args.vocab, (args.seq + 1,))

    def step() -> None:
        n = args.seq
        model(doc[None, :-1], torch.arange(n)[None], None, labels=doc[None, 1:]).sum().backward()

    return step


def worker(args: argparse.Namespace) -> None:
    """One rank (launched by torchrun): build, save once in ``args.mode``, report to rank 0's JSON."""
    import torch.distributed as dist

    from megatron.flexsp.training.checkpoint_dist_writer import DistSaver
    from megatron.flexsp.training.checkpoint_writer import save_state
    from megatron.flexsp.training.core_state import register_core
    from megatron.flexsp.training.state_registry import StateRegistry

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt, sched, step, torch = _build(args)
    registry = register_core(StateRegistry(), model, opt, sched)
    saver = DistSaver(async_save=args.mode.endswith("async-save"))
    saver.prepare()  # the trainer makes the background write's group at start-up, not during a save
    dist.barrier()
    steps = 0
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        if args.mode == "torch":
            save_state(args.out, 1, registry)
            blocked = time.perf_counter() - t0
        else:
            saver.save(args.out, 1, registry)
            blocked = saver.blocked_s
            while saver.in_flight and saver.poll() is None:  # training goes on meanwhile
                step()
                model.zero_grad(set_to_none=True)
                steps += 1
        write = time.perf_counter() - t0
    row = {"rank": rank, "peak_mb": rss.peak, "blocked_s": blocked, "write_s": write, "steps": steps}
    rows = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(row, rows, dst=0)
    if rank == 0:
        Path(args.report).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run_mode(args: argparse.Namespace, mode: str, work: Path) -> dict:
    """One format in fresh processes; the per-rank rows and the checkpoint's size."""
    from megatron.flexsp.launching import free_port

    out, report = work / mode.replace(" ", ""), work / f"{mode.replace(' ', '')}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(args.ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        __file__,
        "--worker",
        "--mode",
        mode,
        "--out",
        str(out),
        "--report",
        str(report),
    ] + [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "vocab", "seq")]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(
            f"checkpoint_bench: {mode} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    rows = json.loads(report.read_text())
    size = _size_mb(out / "iter_0000001")
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "rows": rows, "size_mb": size}


def table(results: list[dict]) -> str:
    lines = [
        f"{'format':<26}{'rank0 peak MB':>14}{'others max MB':>14}{'r0/others':>10}"
        f"{'blocked s':>11}{'write s':>9}{'size MB':>9}{'steps':>7}",
    ]
    sync_s = next((r["rows"][0]["write_s"] for r in results if r["mode"] == "torch_dist"), None)
    for r in results:
        rows = r["rows"]
        r0, others = rows[0]["peak_mb"], max(x["peak_mb"] for x in rows[1:]) if len(rows) > 1 else rows[0]["peak_mb"]
        blocked = max(x["blocked_s"] for x in rows)
        write = max(x["write_s"] for x in rows)
        lines.append(
            f"{r['mode']:<26}{r0:>14.0f}{others:>14.0f}{r0 / others:>10.2f}"
            f"{blocked:>11.2f}{write:>9.2f}{r['size_mb']:>9.0f}{rows[0]['steps']:>7}"
        )
    asyncs = next((r for r in results if r["mode"].endswith("async-save")), None)
    if asyncs is not None and sync_s:
        share = max(x["blocked_s"] for x in asyncs["rows"]) / sync_s
        lines.append(f"async blocked / torch_dist sync save: {share:.1%} (goal <= 20%)")
    dist_row = next((r for r in results if r["mode"] == "torch_dist"), None)
    if dist_row is not None and len(dist_row["rows"]) > 1:
        rows = dist_row["rows"]
        ratio = rows[0]["peak_mb"] / max(x["peak_mb"] for x in rows[1:])
        lines.append(f"torch_dist rank 0 peak / other ranks' max: {ratio:.2f}x (goal <= 1.15x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=128, help="tokens of the training step overlapping an async save")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of: {', '.join(MODES)}")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per format before giving up")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or args.ranks < 1 or args.layers < 1 or args.hidden < 1 or args.hidden % args.heads:
        print(
            f"checkpoint_bench.py: error: bad settings (unknown modes {bad}, or --hidden not divisible by --heads)",
            file=sys.stderr,
        )
        return 2
    print(
        f"checkpoint_bench: {args.ranks} gloo ranks, GPT {args.layers} layers, hidden {args.hidden}, FSDP2 + AdamW",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        results = []
        for mode in modes:
            t0 = time.perf_counter()
            results.append(run_mode(args, mode, Path(tmp)))
            print(f"  {mode}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
