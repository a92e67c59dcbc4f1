"""``flexsp-plan``: what would FlexSP do with my data on my cluster, and what would it gain?

Draws global batches from a length source (text file, .npy, Megatron dataset prefix, or
synthetic long-tail lengths), plans each with every requested method under one cost model and
prints one table with every peer side by side: estimated ms per iteration, ratio to the lower
bound, speedup over ``static`` and FlexSP's speedup over each method, micro-batches, and planning
seconds; ``--explain`` adds where each method's time goes (report.py, explain.py). ``--output``
keeps every plan (JSON) plus a summary (JSON, CSV); ``--plot`` draws each plan on a rank/time chart.

Example::

    flexsp-plan --synthetic 100000 --cost-model gpt-7b --world-size 64 \\
        --global-batch-size 512 --max-seq-len 196608 --iters 5 --output plans/

With ``--tensor-model-parallel-size T`` every method plans over world-size/T units of T GPUs
(``tensor_parallel.unit_cost_model``); plans say ``tensor_parallel_size`` and group degrees count units.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .api import METHODS, PlannerConfig, plan_global_batch
from .costmodel import CostModel, CostModelError
from .lengths_io import OVERLONG_MODES, LengthsError, OverlongReport, apply_max_len, read_lengths
from .mode_choice import planning_modes
from .plan import Plan, PlanError
from .presets import PAPER_WORLD_SIZE, load_cost_model
from .recompute import RECOMPUTE_CHOICES
from .report import (
    MethodStats,
    explain_report,
    flexsp_choice_note,
    format_table,
    plan_wall_s,
    recompute_note,
    summarize,
    tensor_parallel_note,
)
from .tensor_parallel import check_tensor_parallel, unit_cost_model

__all__ = [
    "main",
    "build_parser",
    "iter_batches",
    "run_methods",
    "MethodStats",
    "summarize",
    "format_table",
    "flexsp_choice_note",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexsp-plan",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_length_args(p)
    p.add_argument(
        "--cost-model",
        default="gpt-7b",
        help="cost model JSON file or preset name (gpt-7b, gpt-13b, gpt-30b, cpu-tiny)",
    )
    p.add_argument("--world-size", type=int, default=PAPER_WORLD_SIZE, help="number of GPUs (ranks)")
    p.add_argument("--global-batch-size", type=int, default=512, help="sequences per global batch")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="longest planned length (static is sized for it); default: the longest in the data (synthetic: 196608)",
    )
    p.add_argument(
        "--overlong",
        choices=OVERLONG_MODES,
        default="truncate",
        help="what to do with sequences longer than --max-seq-len",
    )
    p.add_argument("--iters", type=int, default=5, help="global batches to plan")
    p.add_argument(
        "--seed", type=int, default=PlannerConfig.seed, help="seed of batch sampling, synthetic lengths and the solver"
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument(
        "--time-limit",
        type=float,
        default=PlannerConfig.time_limit_s,
        help="FlexSP time limit per global batch (s): bounds the whole solve, baseline comparison included",
    )
    p.add_argument(
        "--gap",
        type=float,
        default=PlannerConfig.gap,
        help="FlexSP stops improving once its plan is within this fraction of the lower bound",
    )
    p.add_argument(
        "--static-degree", type=int, default=None, help="force the static baseline's degree (units at TP > 1)"
    )
    _add_tensor_parallel_args(p)
    _add_output_args(p)
    return p


def _add_length_args(p: argparse.ArgumentParser) -> None:
    """Where the lengths come from: a file or dataset, or the synthetic generator."""
    src = p.add_argument_group("lengths (give exactly one)")
    src.add_argument(
        "lengths",
        nargs="?",
        help="text file (one length per line), .npy, or Megatron dataset prefix "
        "(PREFIX.bin/.idx; a document of n ids has length n - 1)",
    )
    src.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="N synthetic long-tail lengths (log-normal body, Pareto tail up to --max-seq-len)",
    )


def _add_tensor_parallel_args(p: argparse.ArgumentParser) -> None:
    """Megatron's TP flags: the methods then plan over units of T GPUs."""
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        metavar="T",
        help="plan over world-size/T units of T GPUs (one TP group each, inside a node); every method alike",
    )
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="with TP: Megatron's TP-sequence parallelism, activations split fully over the T GPUs of a unit",
    )


def _unit_model(args, cost: CostModel) -> CostModel:
    """The cost model the methods plan with: per GPU, or per unit of T GPUs (CostModelError if T cannot be)."""
    t = args.tensor_model_parallel_size
    check_tensor_parallel(cost, t, args.world_size)
    if t == 1 and args.sequence_parallel:
        raise CostModelError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    unit = unit_cost_model(cost, t, sequence_parallel=args.sequence_parallel)
    unit.check_world_size(args.world_size // t)
    return unit


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """What to write and print besides the table (and how groups recompute, which the plots show)."""
    p.add_argument(
        "--recompute",
        choices=RECOMPUTE_CHOICES,
        default=PlannerConfig.recompute,
        help="activation recomputation of every SP group, or auto: per group the fastest mode whose memory fits "
        "(modes other than none need the cost model's 'recompute' coefficients)",
    )
    p.add_argument("--output", type=Path, default=None, help="directory for plans and summary.json/.csv")
    p.add_argument("--plot", action="store_true", help="draw every plan as a PNG under --output/plots")
    p.add_argument(
        "--explain",
        action="store_true",
        help="per batch and method: the estimate split into unavoidable time and the losses to degree (a2a), "
        "imbalance, extra micro-batches and memory-limited packing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def iter_batches(num_docs: int, global_batch_size: int, iters: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of consecutive global batches over a stream of per-epoch permutations (seed, epoch)."""
    buf = np.empty(0, dtype=np.int64)
    epoch = 0
    for _ in range(iters):
        while buf.size < global_batch_size:
            perm = np.random.default_rng([seed, epoch]).permutation(num_docs)
            buf = np.concatenate([buf, perm])
            epoch += 1
        yield buf[:global_batch_size]
        buf = buf[global_batch_size:]


def run_methods(
    batches: Sequence[Sequence[int]],
    cost: CostModel,
    methods: Sequence[str],
    *,
    world_size: int,
    max_seq_len: int | None,
    time_limit_s: float,
    seed: int,
    static_degree: int | None = None,
    on_plan=None,
    progress: bool = False,
    gap: float = PlannerConfig.gap,
    recompute: str = PlannerConfig.recompute,
) -> dict[str, list[Plan]]:
    """Plan every batch with every method; ``on_plan(k, method, plan)`` is called for each plan."""
    out: dict[str, list[Plan]] = {m: [] for m in methods}
    it = enumerate(batches)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(batches), desc="planning", unit="batch", file=sys.stderr)
    for k, lengths in it:
        for m in methods:
            cfg = PlannerConfig(
                world_size=world_size,
                method=m,
                time_limit_s=time_limit_s,
                max_seq_len=max_seq_len,
                static_degree=static_degree,
                seed=seed + k,
                gap=gap,
                recompute=recompute,
            )
            t0 = time.perf_counter()
            plan = plan_global_batch(lengths, cost, cfg)
            plan.solver.extra.setdefault("wall_s", time.perf_counter() - t0)
            out[m].append(plan)
            if on_plan is not None:
                on_plan(k, m, plan)
    return out


def _load_lengths(args, parser) -> tuple[np.ndarray, OverlongReport, int]:
    if (args.lengths is None) == (args.synthetic is None):
        parser.error("give exactly one length source: a LENGTHS file/prefix or --synthetic N")
    if args.synthetic is not None:
        if args.synthetic < 1:
            parser.error(f"--synthetic must be >= 1, got {args.synthetic}")
        from megatron.flexsp.data.synthetic import longtail_lengths

        max_len = args.max_seq_len or 196608
        raw = longtail_lengths(args.synthetic, max_len=max_len, seed=args.seed)
        return raw, OverlongReport(), max_len
    raw = read_lengths(args.lengths)
    lengths, report = apply_max_len(raw, args.max_seq_len, args.overlong)
    return lengths, report, args.max_seq_len or int(lengths.max())


def _check_args(args, parser) -> list[str]:
    """The methods asked for; parser.error on any argument out of range."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)}")
    for name in ("world_size", "global_batch_size", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        parser.error(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be > 0, got {args.time_limit}")
    if not 0 <= args.gap < 1:
        parser.error(f"--gap must be in [0, 1), got {args.gap}")
    if args.plot and args.output is None:
        parser.error("--plot needs --output DIR")
    return methods


def _plan_writer(args, cost: CostModel, methods: list[str]):
    """Make the output folders; the ``on_plan`` callback that saves (and draws) each plan there."""
    out = args.output
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for m in methods:
            (out / "plans" / m).mkdir(parents=True, exist_ok=True)
        if args.plot:
            (out / "plots").mkdir(exist_ok=True)

    def on_plan(k: int, m: str, plan: Plan) -> None:
        if out is None:
            return
        plan.save(out / "plans" / m / f"iter_{k:04d}.json")
        if args.plot:
            from .plotting import plot_plan

            plot_plan(plan, cost, out / "plots" / f"{m}_iter_{k:04d}.png")

    return on_plan


def _write_summary(
    args, cost: CostModel, lengths: np.ndarray, report: OverlongReport, max_len: int, rows, results
) -> None:
    """summary.json (settings and per-method statistics) and summary.csv (one row per plan) under --output."""
    out = args.output
    summary = {
        "cost_model": cost.to_dict(),
        "world_size": args.world_size,
        "tensor_parallel_size": args.tensor_model_parallel_size,
        "sequence_parallel": args.sequence_parallel,
        "global_batch_size": args.global_batch_size,
        "max_seq_len": max_len,
        "overlong": args.overlong,
        "truncated": report.truncated,
        "dropped": report.dropped,
        "num_sequences": int(lengths.size),
        "iters": args.iters,
        "seed": args.seed,
        "methods": [asdict(r) for r in rows],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iter", "method", "estimated_ms", "lower_bound_ms", "plan_s", "micro_batches", "status"])
        for m, plans in results.items():
            for k, p in enumerate(plans):
                w.writerow(
                    [
                        k,
                        m,
                        f"{p.estimated_time_ms:.3f}",
                        f"{p.solver.lower_bound_ms:.3f}",
                        f"{plan_wall_s(p):.4f}",
                        p.num_micro_batches,
                        p.solver.status,
                    ]
                )
    print(f"flexsp-plan: wrote {sum(len(v) for v in results.values())} plans and summary.json/.csv to {out}")


def _units_note(args) -> str:
    t = args.tensor_model_parallel_size
    if t == 1:
        return ""
    sp = ", sequence parallel" if args.sequence_parallel else ""
    return f" as {args.world_size // t} units of {t} GPUs (tensor parallel{sp}; group degrees count units)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = _check_args(args, parser)
    try:
        cost = load_cost_model(args.cost_model, args.world_size)
        cost.check_world_size(args.world_size)
        cost = _unit_model(args, cost)
        units = args.world_size // args.tensor_model_parallel_size
        planning_modes(cost, args.recompute)  # a mode the cost model lacks: one line, before any work
        lengths, report, max_len = _load_lengths(args, parser)
    except (CostModelError, LengthsError) as e:
        parser.error(str(e))

    print(
        f"flexsp-plan: {lengths.size} sequences (median {int(np.median(lengths))}, max {int(lengths.max())}), "
        f"max length {max_len}: {report.truncated} truncated, {report.dropped} dropped; cost model "
        f"'{cost.name}', {args.world_size} ranks{_units_note(args)}, global batch {args.global_batch_size}, "
        f"{args.iters} iteration(s)"
    )
    batches = [
        lengths[idx].tolist() for idx in iter_batches(lengths.size, args.global_batch_size, args.iters, args.seed)
    ]
    try:
        results = run_methods(
            batches,
            cost,
            methods,
            world_size=units,
            max_seq_len=max_len,
            time_limit_s=args.time_limit,
            seed=args.seed,
            static_degree=args.static_degree,
            on_plan=_plan_writer(args, cost, methods),
            progress=not args.quiet,
            gap=args.gap,
            recompute=args.recompute,
        )
    except PlanError as e:
        print(f"flexsp-plan: error: {e}", file=sys.stderr)
        return 1
    rows = summarize(results)
    print(format_table(rows))
    note = flexsp_choice_note(results)
    if note:
        print(note)
    if args.recompute != "none":
        print(recompute_note(results, args.recompute))
    tp_note = tensor_parallel_note(results)
    if tp_note:
        print(tp_note)
    if args.explain:
        print()
        print(explain_report(results, cost))
    if args.output is not None:
        _write_summary(args, cost, lengths, report, max_len, rows, results)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
