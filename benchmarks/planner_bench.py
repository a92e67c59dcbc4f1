#!/usr/bin/env python
"""Planner benchmark: plan quality and planning time of every method, as a table per scenario.

Scenarios (issue 2):
* reference: GPT-7B preset of the paper's cluster, 64 GPUs, global batch 512, max length 192K;
* scale: the same model on 1024 GPUs (128 nodes), global batch 8192.

Lengths are synthetic long-tail lengths (megatron.flexsp.data.synthetic defaults: most under
2K, a Pareto tail to the max length) unless ``--lengths`` gives a file (text, .npy or a Megatron
dataset prefix). Columns: estimated ms per iteration (mean), speedup over ``static``, mean
ratio to the lower bound, planning seconds (median and max over iterations). Nothing here is
asserted; the numbers are for the reader.

    python benchmarks/planner_bench.py                 # both scenarios, a few minutes on 2 cores
    python benchmarks/planner_bench.py --skip-large --iters 20
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.api import METHODS
from megatron.flexsp.planner.cli import flexsp_choice_note, format_table, iter_batches, run_methods, summarize
from megatron.flexsp.planner.costmodel import preset
from megatron.flexsp.planner.lengths_io import apply_max_len, read_lengths


def scenario(title: str, pool: np.ndarray, *, model: str, world_size: int, gbs: int, max_len: int, iters: int,
             time_limit: float, seed: int, methods: list[str]) -> None:
    cost = preset(model, world_size)
    batches = [pool[idx].tolist() for idx in iter_batches(pool.size, gbs, iters, seed)]
    tokens = [sum(b) for b in batches]
    print(f"\n== {title}: {model}, {world_size} GPUs, global batch {gbs}, max length {max_len}, {iters} iteration(s), "
          f"solver time limit {time_limit:g} s")
    print(f"   tokens per batch: mean {np.mean(tokens):.0f}; longest sequence per batch: "
          f"{', '.join(str(max(b)) for b in batches[:8])}{' ...' if iters > 8 else ''}")
    t0 = time.perf_counter()
    results = run_methods(batches, cost, methods, world_size=world_size, max_seq_len=max_len,
                          time_limit_s=time_limit, seed=seed, progress=sys.stderr.isatty())
    print(format_table(summarize(results)))
    note = flexsp_choice_note(results)
    if note:
        print(note)
    print(f"   ({time.perf_counter() - t0:.1f} s wall for the table)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", help="text file, .npy or Megatron prefix instead of synthetic lengths")
    p.add_argument("--pool", type=int, default=200_000, help="synthetic documents to draw batches from")
    p.add_argument("--tail-frac", type=float, default=None, help="synthetic: fraction of Pareto-tail sequences")
    p.add_argument("--pareto-alpha", type=float, default=None, help="synthetic: Pareto shape (smaller: heavier)")
    p.add_argument("--median", type=float, default=None, help="synthetic: median of the log-normal body")
    p.add_argument("--iters", type=int, default=10, help="iterations of the 64-GPU scenario")
    p.add_argument("--iters-large", type=int, default=2, help="iterations of the 1024-GPU scenario")
    p.add_argument("--time-limit", type=float, default=2.0, help="FlexSP solver limit per batch (64 GPUs)")
    p.add_argument("--time-limit-large", type=float, default=30.0, help="FlexSP solver limit per batch (1024 GPUs)")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    max_len = 196608
    if args.lengths:
        pool, rep = apply_max_len(read_lengths(args.lengths), max_len, "truncate")
        print(f"lengths from {args.lengths}: {pool.size} sequences, {rep.truncated} truncated to {max_len}")
    else:
        shape = {k: v for k, v in (("tail_frac", args.tail_frac), ("pareto_alpha", args.pareto_alpha),
                                   ("median", args.median)) if v is not None}
        pool = longtail_lengths(args.pool, max_len=max_len, seed=args.seed, **shape)
        print(f"synthetic lengths {shape or '(defaults)'}: {pool.size} sequences, median {int(np.median(pool))}, mean {pool.mean():.0f}, "
              f"{(pool < 2048).mean():.0%} under 2K, {(pool > 65536).mean():.2%} over 64K, max {pool.max()}")
    methods = [m for m in args.methods.split(",") if m]
    scenario("reference", pool, model="gpt-7b", world_size=64, gbs=512, max_len=max_len, iters=args.iters,
             time_limit=args.time_limit, seed=args.seed, methods=methods)
    if not args.skip_large:
        scenario("scale", pool, model="gpt-7b", world_size=1024, gbs=8192, max_len=max_len, iters=args.iters_large,
                 time_limit=args.time_limit_large, seed=args.seed, methods=methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
