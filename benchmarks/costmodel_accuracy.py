"""Cost-model accuracy on the CPU cluster: profile, train every sp-mode, estimated vs measured ms.

Why: the planner optimises the cost model's estimate, so the estimate must track what the
runtime really does. This benchmark runs `flexsp-profile` on N gloo ranks (the same model
flags as the trainer), then trains each sp-mode with that cost model and compares, per
iteration after a warm-up, the plan's estimate (planner/plan.estimate_plan_ms) with

* the measured iteration time (iter_ms: plan wait, data, forward+backward, optimizer step) and
* the measured forward+backward time (compute_ms: the slowest rank's executor time), which is
  what the cost model describes (it has no term for the optimizer step or planning).

Target: within 15% (mean absolute error of the per-iteration estimates of forward+backward).
Each mode runs --runs times on the same batches and plans; per iteration the fastest run is kept
(other work on the machine only adds time). Plans are made inline by default (--plan-ahead 0),
so on a 2-core machine the planner's solver does not compete with the timed ranks.
Prints one table.

    python benchmarks/costmodel_accuracy.py [--nproc 4] [--train-iters 8] [--cost-model FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # megatron.flexsp (namespace portion of this checkout)

from megatron.flexsp.launching import free_port, run_bounded, torchrun_command  # noqa: E402

MODES = ("flexsp", "static", "batch-adaptive", "megatron-hybrid-cp")


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    """Run a torchrun command, output to ``log``; stop its whole process tree on timeout."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHON=sys.executable)
    r = run_bounded(cmd, timeout, log=log, cwd=ROOT, env=env)
    if r.timed_out:
        raise SystemExit(f"timed out after {timeout:.0f}s: {' '.join(cmd)} (log: {log})")
    rc = r.returncode
    if rc != 0:
        tail = [x for x in log.read_text().splitlines() if "Warning" not in x and "warn(" not in x][-25:]
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\n" + "\n".join(tail))


def _launcher(nproc: int, emulated_nodes: int, link_mbit: int, timeout_s: float) -> list[str]:
    """torchrun on this host, or scripts/emulated_cluster.sh (network-namespace nodes, shaped links)."""
    if emulated_nodes:
        if nproc % emulated_nodes:
            raise SystemExit(f"--nproc {nproc} is not a multiple of --emulated-nodes {emulated_nodes}")
        return [
            "bash",
            str(ROOT / "scripts" / "emulated_cluster.sh"),
            "--nodes",
            str(emulated_nodes),
            "--gpus-per-node",
            str(nproc // emulated_nodes),
            "--link-mbit",
            str(link_mbit),
            "--timeout",
            str(int(timeout_s)),
            "--port",
            str(free_port()),
            "--",
        ]
    return torchrun_command(nproc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--train-iters", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up iterations left out (default 2)")
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument(
        "--capacity-tokens",
        type=int,
        default=None,
        help="tokens one rank holds (artificial CPU memory limit; default seq-length / nproc, so the "
        "longest documents need every rank)",
    )
    p.add_argument("--profile-repeats", type=int, default=3)
    p.add_argument(
        "--plan-ahead",
        type=int,
        default=0,
        help="trainer's --flexsp-plan-ahead (default 0: plan inline, so on a small CPU machine the "
        "planner's solver does not share the cores with the ranks while they are timed)",
    )
    p.add_argument(
        "--runs", type=int, default=2, help="training runs per mode; per iteration the fastest is kept (default 2)"
    )
    p.add_argument(
        "--stat",
        choices=["min", "median"],
        default="min",
        help="profiler statistic of repeated timings (default min: robust to other work on the machine)",
    )
    p.add_argument("--cost-model", default=None, help="use this cost-model JSON instead of profiling")
    p.add_argument("--out", default=None, help="output folder (default outputs/costmodel-accuracy-<time>)")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more trainer flags for every run")
    p.add_argument(
        "--emulated-nodes",
        type=int,
        default=0,
        help="run on scripts/emulated_cluster.sh with this many network-namespace nodes (needs root)",
    )
    p.add_argument("--link-mbit", type=int, default=200, help="inter-node link of the emulated cluster")
    a = p.parse_args(argv)
    launch = lambda: _launcher(a.nproc, a.emulated_nodes, a.link_mbit, a.timeout_s)  # noqa: E731
    where = (
        f"{a.emulated_nodes} emulated nodes x {a.nproc // max(1, a.emulated_nodes)} gloo ranks, "
        f"{a.link_mbit} Mbit/s links"
        if a.emulated_nodes
        else f"{a.nproc} gloo ranks on one host"
    )
    out = Path(a.out or ROOT / "outputs" / f"costmodel-accuracy-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for x in a.extra if x != "--"]
    model = [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--group-query-attention",
        "--num-query-groups",
        "2",
        "--swiglu",
        "--seq-length",
        str(a.seq_length),
        "--seed",
        "1234",
    ]

    cost_path = Path(a.cost_model) if a.cost_model else out / "cost_model.json"
    if not a.cost_model:
        cap = a.capacity_tokens or max(1, a.seq_length // a.nproc)
        t0 = time.perf_counter()
        print(f"profiling on {where} (capacity {cap} tokens per rank) ...", flush=True)
        _run(
            launch()
            + [
                "-m",
                "megatron.flexsp.training.profiler",
                *model,
                *extra,
                "--capacity-tokens",
                str(cap),
                "--profile-repeats",
                str(a.profile_repeats),
                "--profile-warmup",
                "1",
                "--profile-stat",
                a.stat,
                "--output",
                str(cost_path),
            ],
            out / "profile.log",
            a.timeout_s,
        )
        print(f"  done in {time.perf_counter() - t0:.0f}s: {cost_path}")
        for line in (out / "profile.log").read_text().splitlines():
            if line.startswith(("compute fit", "  ", "memory (")) and "Warning" not in line:
                print(line)
    cm = json.loads(cost_path.read_text())
    print(
        f"cost model: alpha1 {cm['compute']['alpha1_ms_per_token2']:.3g} alpha2 "
        f"{cm['compute']['alpha2_ms_per_token']:.3g} beta1 {cm['compute']['beta1_ms']:.3g} ms, bandwidth "
        f"{cm['alltoall']['bandwidth_gbs']} GB/s, {cm['memory']['activation_mb_per_token']:.4g} MB/token"
    )

    rows = []
    for mode in [m for m in a.modes.split(",") if m]:
        t0 = time.perf_counter()
        runs = []
        for k in range(a.runs):
            metrics = out / f"metrics-{mode}-{k}.jsonl"
            metrics.unlink(missing_ok=True)
            _run(
                launch()
                + [
                    "pretrain_gpt_flexsp.py",
                    *model,
                    "--global-batch-size",
                    str(a.global_batch_size),
                    "--train-iters",
                    str(a.train_iters),
                    "--lr",
                    "1e-3",
                    "--log-interval",
                    "1",
                    "--no-progress-bar",
                    "--flexsp-plan-ahead",
                    str(a.plan_ahead),
                    "--flexsp-cost-model",
                    str(cost_path),
                    "--sp-mode",
                    mode,
                    "--metrics-file",
                    str(metrics),
                    *extra,
                ],
                out / f"train-{mode}-{k}.log",
                a.timeout_s,
            )
            runs.append([json.loads(x) for x in metrics.read_text().splitlines() if x.strip()])
        # per iteration, the fastest of the runs (same batches and plans; interference only adds time)
        use = []
        for i in range(a.skip, min(len(r) for r in runs)):
            use.append(min((r[i] for r in runs), key=lambda x: x["iter_ms"]))
        if not use:
            use = [min((r[-1] for r in runs), key=lambda x: x["iter_ms"])]
        est = [r["estimated_ms"] for r in use]
        it = [r["iter_ms"] for r in use]
        fb = [r["compute_ms"] for r in use]
        err_it = statistics.mean(abs(e - m) / m for e, m in zip(est, it))
        err_fb = statistics.mean(abs(e - m) / m for e, m in zip(est, fb))
        med_it = statistics.median(abs(e - m) / m for e, m in zip(est, fb))
        rows.append(
            (
                mode,
                len(use),
                statistics.mean(est),
                statistics.mean(fb),
                statistics.mean(it),
                err_fb,
                err_it,
                statistics.mean(r["micro_batches"] for r in use),
                med_it,
            )
        )
        print(f"  {mode}: {a.runs} run(s) of {a.train_iters} iterations in {time.perf_counter() - t0:.0f}s", flush=True)

    print()
    print(
        f"{'sp-mode':<20}{'iters':>6}{'mb/iter':>8}{'est ms':>10}{'fwd+bwd ms':>12}{'iter ms':>10}"
        f"{'err fwd+bwd':>13}{'err iter':>10}{'median err':>12}  within 15%"
    )
    for mode, n, e, fb, it, efb, eit, mb, med in rows:
        ok = "yes" if efb <= 0.15 else ("median only" if med <= 0.15 else "no")
        print(
            f"{mode:<20}{n:>6}{mb:>8.1f}{e:>10.1f}{fb:>12.1f}{it:>10.1f}{100 * efb:>12.1f}%{100 * eit:>9.1f}%"
            f"{100 * med:>11.1f}%  {ok}"
        )
    print(
        "(err: mean over iterations of |estimate - measured| / measured; fwd+bwd = the slowest rank's forward+"
        "backward time, which the cost model describes (the target applies to it); iter = the whole step, adding "
        "the optimizer step and, with --plan-ahead 0, the planner's solve time; median err: median over "
        "iterations of the fwd+bwd error, robust to load spikes from other processes; estimate = "
        "plan.estimated_time_ms)"
    )
    try:
        print(f"(machine load average during the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    except OSError:
        pass
    print(f"(logs, metrics and the cost model in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
