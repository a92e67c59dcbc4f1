#!/usr/bin/env python
"""Planner benchmark: the anytime FlexSP planner against the issue's targets, one table per scenario.

Scenarios (issue 9 targets in brackets; estimates are the cost model's, nothing here is asserted):

* small: 4 ranks x 32 sequences, ``cpu-tiny-ddp``, lengths up to 2048 (the emulated CPU
  cluster the trainer runs on)  [median 20 ms wall, max 100 ms, within 1.03x of the lower bound];
* reference: GPT-7B preset of the paper's cluster, 64 GPUs x 512 sequences, long-tail synthetic
  lengths up to 192K  [median 0.3 s, ratio to the bound no worse than before: 1.11x];
* scale: the same model on 1024 GPUs x 8192 sequences  [5 s or less].

Lengths: ``megatron.flexsp.data.synthetic.longtail_lengths`` pools (as ``flexsp-plan
--synthetic`` draws them), batches by ``cli.iter_batches``. Every plan goes through
``api.plan_global_batch`` (the trainer's path: baselines, solver and validation under one
deadline). Columns: wall ms (median, max) of the whole call, estimated ms per iteration, ratio to
the lower bound (mean, max), and which plan was kept (the solver's, or an equal/better baseline's).
The machine's load average is printed before and after: timings on a shared machine are only
meaningful next to it.

    python benchmarks/planner_bench.py                      # all three, about a minute on 2 cores
    python benchmarks/planner_bench.py --skip-large --iters 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.api import PlannerConfig, plan_global_batch
from megatron.flexsp.planner.bounds import lower_bound_ms
from megatron.flexsp.planner.cli import iter_batches
from megatron.flexsp.planner.presets import load_cost_model


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def scenario(
    title: str,
    *,
    model: str,
    world_size: int,
    gbs: int,
    max_len: int,
    pool_size: int,
    iters: int,
    time_limit: float,
    gap: float,
    seed: int,
    methods: tuple[str, ...],
) -> dict:
    cost = load_cost_model(model, world_size)
    pool = longtail_lengths(pool_size, max_len=max_len, seed=seed)
    batches = [pool[idx].tolist() for idx in iter_batches(pool.size, gbs, iters, seed)]
    print(
        f"\n== {title}: {model}, {world_size} ranks x {gbs} sequences (max {max_len}), {iters} batches, "
        f"time limit {time_limit:g} s, gap {gap:g}"
    )
    # warm-up: the first call of a process pays numpy/scipy start-up, which a running trainer has paid
    plan_global_batch(batches[0][: max(1, gbs // 8)], cost, PlannerConfig(world_size=world_size, time_limit_s=0.05))
    head = (
        f"{'method':<20} {'wall ms med':>11} {'wall ms max':>11} {'est. ms/iter':>13} {'/LB mean':>9} "
        f"{'/LB max':>8}  kept"
    )
    print(head)
    print("-" * (len(head) + 30))
    out = {}
    for m in methods:
        walls, est, ratios, kept = [], [], [], {}
        for L in batches:
            cfg = PlannerConfig(world_size=world_size, method=m, time_limit_s=time_limit, max_seq_len=max_len, gap=gap)
            t0 = time.perf_counter()
            p = plan_global_batch(L, cost, cfg)
            walls.append(time.perf_counter() - t0)
            est.append(p.estimated_time_ms)
            ratios.append(p.estimated_time_ms / lower_bound_ms(L, cost, world_size))
            c = str(p.solver.extra.get("chosen", "-"))
            kept[c] = kept.get(c, 0) + 1
        row = dict(
            wall_med_ms=1e3 * statistics.median(walls),
            wall_max_ms=1e3 * max(walls),
            est_ms=statistics.fmean(est),
            ratio_mean=statistics.fmean(ratios),
            ratio_max=max(ratios),
            kept=kept,
        )
        out[m] = row
        kept_s = ", ".join(f"{k} {v}" for k, v in sorted(kept.items())) if m == "flexsp" else ""
        print(
            f"{m:<20} {row['wall_med_ms']:>11.1f} {row['wall_max_ms']:>11.1f} {row['est_ms']:>13.1f} "
            f"{row['ratio_mean']:>8.4f}x {row['ratio_max']:>7.4f}x  {kept_s}"
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10, help="batches of the 64-GPU scenario")
    p.add_argument("--iters-small", type=int, default=20, help="batches of the 4-rank scenario")
    p.add_argument("--iters-large", type=int, default=2, help="batches of the 1024-GPU scenario")
    p.add_argument(
        "--time-limit-small",
        default="0.02,0.05",
        help="planner limit(s) per batch, 4 ranks (s; comma-separated: one table each)",
    )
    p.add_argument("--time-limit", type=float, default=0.3, help="planner limit per batch, 64 GPUs (s)")
    p.add_argument("--time-limit-large", type=float, default=4.5, help="planner limit per batch, 1024 GPUs (s)")
    p.add_argument(
        "--gap", type=float, default=PlannerConfig.gap, help="stop once within this fraction of the lower bound"
    )
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--baselines", action="store_true", help="also time the baseline methods (reference rows)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    methods = ("flexsp", "megatron-hybrid-cp", "batch-adaptive") if args.baselines else ("flexsp",)
    print(f"load average before: {_load()}")
    t0 = time.perf_counter()
    small = dict(model="cpu-tiny-ddp", world_size=4, gbs=32, max_len=2048, pool_size=5000, iters=args.iters_small)
    runs = [("small", dict(small, time_limit=float(tl))) for tl in args.time_limit_small.split(",") if tl]
    paper = dict(model="gpt-7b", max_len=196608, pool_size=200_000)
    runs.append(("reference", dict(paper, world_size=64, gbs=512, iters=args.iters, time_limit=args.time_limit)))
    if not args.skip_large:
        scale = dict(paper, world_size=1024, gbs=8192, iters=args.iters_large, time_limit=args.time_limit_large)
        runs.append(("scale", scale))
    for title, run in runs:
        scenario(title, **run, gap=args.gap, seed=args.seed, methods=methods)
    print(f"\n({time.perf_counter() - t0:.1f} s wall)  load average after: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
