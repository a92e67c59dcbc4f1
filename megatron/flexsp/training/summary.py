"""End-of-run summary and the comparison table of several runs' metrics files.

Throughput is averaged as total tokens / total time over the iterations after a short warm-up
(the first iterations pay one-off costs: process-group set-up, allocator growth, the planner
starting), so runs of different modes compare like for like.

CLI (used by scripts/compare_sp_modes.sh and scripts/quickstart.sh)::

    python -m megatron.flexsp.training.summary compare RUN.jsonl [RUN.jsonl ...] [--baseline static]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunSummary", "summarize", "read_metrics", "format_summary", "compare_table", "main"]


@dataclass
class RunSummary:
    name: str
    sp_mode: str
    iterations: int
    measured_iterations: int
    tokens_per_s: float
    iter_ms: float
    estimated_ms: float | None
    final_loss: float
    first_loss: float
    micro_batches: float
    a2a_share: float
    groups_by_degree: dict[str, int]
    fallback_plans: int
    paired_baseline: str | None = None  # --flexsp-compare-with: same batches, executed back to back
    exec_ms: float | None = None
    baseline_exec_ms: float | None = None
    max_loss_diff: float | None = None

    @property
    def paired_speedup(self) -> float | None:
        if not self.exec_ms or self.baseline_exec_ms is None:
            return None
        return self.baseline_exec_ms / self.exec_ms


def warmup_count(n: int) -> int:
    """Iterations left out of throughput averages: 1 for short runs, 2 from 8 on (the first plan-ahead
    batches wait for the background planner's start-up), about 10% for long ones."""
    if n <= 2:
        return 0
    return max(2 if n >= 8 else 1, n // 10)


def summarize(records: Sequence[Mapping[str, Any]], name: str = "run") -> RunSummary:
    """Summary of per-iteration metric dicts (IterationRecord.to_json() or metrics-file lines)."""
    recs = [r for r in records if "tokens_per_s" in r]
    if not recs:
        raise ValueError(f"{name}: no training iterations in the metrics")
    recs = sorted(recs, key=lambda r: r["iteration"])
    w = warmup_count(len(recs))
    body = recs[w:]
    tokens = sum(r.get("tokens", r["tokens_per_s"] * r["iter_ms"] / 1e3) for r in body)
    ms = sum(r["iter_ms"] for r in body)
    est = [r["estimated_ms"] for r in body if r.get("estimated_ms") is not None]
    groups: dict[str, int] = {}
    for r in recs:
        for d, n in (r.get("groups_by_degree") or {}).items():
            groups[str(d)] = groups.get(str(d), 0) + int(n)
    a2a = sum(r.get("a2a_ms", r.get("a2a_share", 0.0) * r["iter_ms"]) for r in body)
    paired = [r for r in body if r.get("baseline_exec_ms") is not None and r.get("exec_ms")]
    pair_kw: dict[str, Any] = {}
    if paired and len(paired) == len(body):
        pair_kw = dict(
            paired_baseline=str(paired[-1].get("baseline_mode")),
            exec_ms=sum(r["exec_ms"] for r in paired) / len(paired),
            baseline_exec_ms=sum(r["baseline_exec_ms"] for r in paired) / len(paired),
            max_loss_diff=max(abs(r["baseline_loss"] - r["loss"]) for r in paired),
        )
    return RunSummary(
        name=name,
        sp_mode=str(recs[-1].get("sp_mode", "?")),
        iterations=int(recs[-1]["iteration"]),
        measured_iterations=len(body),
        tokens_per_s=tokens / (ms / 1e3) if ms > 0 else 0.0,
        iter_ms=ms / len(body),
        estimated_ms=sum(est) / len(est) if est else None,
        final_loss=float(recs[-1]["loss"]),
        first_loss=float(recs[0]["loss"]),
        micro_batches=sum(r["micro_batches"] for r in body) / len(body),
        a2a_share=a2a / ms if ms > 0 else 0.0,
        groups_by_degree=dict(sorted(groups.items(), key=lambda kv: int(kv[0]))),
        fallback_plans=sum(1 for r in recs if str(r.get("plan_source", "")).startswith("fallback")),
        **pair_kw,
    )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The training records of a metrics JSONL file (validation lines are skipped)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"metrics file not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not a JSON line: {e}") from None
        if "tokens_per_s" in rec:
            out.append(rec)
    return out


def format_summary(s: RunSummary) -> str:
    est = f"{s.estimated_ms:.1f}" if s.estimated_ms is not None else "-"
    groups = " ".join(f"d{d}x{n}" for d, n in s.groups_by_degree.items())
    rows = [
        ("sp mode", s.sp_mode),
        ("iterations", f"{s.iterations} ({s.measured_iterations} measured after warm-up)"),
        ("tokens/s", f"{s.tokens_per_s:,.1f}"),
        ("ms/iteration (measured)", f"{s.iter_ms:.1f}"),
        ("ms/iteration (planner estimate)", est),
        ("micro-batches / iteration", f"{s.micro_batches:.2f}"),
        ("all-to-all share", f"{100 * s.a2a_share:.1f}%"),
        ("groups by degree (all iterations)", groups or "-"),
        ("fallback plans", str(s.fallback_plans)),
        ("loss first -> final", f"{s.first_loss:.4f} -> {s.final_loss:.4f}"),
    ]
    if s.paired_speedup is not None:
        rows += [
            (f"paired: {s.sp_mode} step ms", f"{s.exec_ms:.1f}"),
            (f"paired: {s.paired_baseline} step ms", f"{s.baseline_exec_ms:.1f}  (same batches, back to back)"),
            (f"paired speedup over {s.paired_baseline}", f"{s.paired_speedup:.2f}x"),
            ("paired: largest loss difference", f"{s.max_loss_diff:.2e}"),
        ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 30)
    return "\n".join([line, "training summary", line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def compare_table(summaries: Iterable[RunSummary], baseline: str | None = "static") -> str:
    """One row per run: tokens/s, ms/iteration, speedup over the baseline mode's run, final loss."""
    runs = list(summaries)
    base = next((s for s in runs if s.sp_mode == baseline or s.name == baseline), None)
    base_tps = base.tokens_per_s if base is not None else None
    head = (
        f"{'run':<22} {'sp-mode':<20} {'tokens/s':>11} {'ms/iter':>10} {'est ms':>9} {'speedup':>8} "
        f"{'micro-b':>8} {'a2a %':>6} {'final loss':>11}"
    )
    lines = [head, "-" * len(head)]
    for s in runs:
        sp = f"{s.tokens_per_s / base_tps:.2f}x" if base_tps else "-"
        est = f"{s.estimated_ms:.1f}" if s.estimated_ms is not None else "-"
        lines.append(
            f"{s.name:<22} {s.sp_mode:<20} {s.tokens_per_s:>11,.1f} {s.iter_ms:>10.1f} {est:>9} {sp:>8} "
            f"{s.micro_batches:>8.2f} {100 * s.a2a_share:>6.1f} {s.final_loss:>11.5f}"
        )
    if base is None and baseline:
        lines.append(f"(no '{baseline}' run: no speedup column)")
    for s in runs:
        if s.paired_speedup is not None:
            lines.append(
                f"paired ({s.name}: every batch also run under {s.paired_baseline}, back to back, order "
                f"alternating): {s.exec_ms:.1f} vs {s.baseline_exec_ms:.1f} ms per step = "
                f"{s.paired_speedup:.2f}x, largest loss difference {s.max_loss_diff:.1e}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron.flexsp.training.summary")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="one table from several metrics files")
    c.add_argument("files", nargs="+", help="metrics JSONL files, optionally NAME=PATH")
    c.add_argument("--baseline", default="static", help="sp-mode (or run name) the speedup is relative to")
    s = sub.add_parser("show", help="the summary of one metrics file")
    s.add_argument("file")
    a = p.parse_args(argv)
    try:
        if a.cmd == "show":
            print(format_summary(summarize(read_metrics(a.file), Path(a.file).stem)))
            return 0
        sums = []
        for spec in a.files:
            name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).stem, "", spec)
            sums.append(summarize(read_metrics(path), name))
        print(compare_table(sums, a.baseline))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
