"""One table from the trainer's --metrics-file outputs (one JSON object per logged iteration).

Usage: metrics_table.py [--skip N] metrics-flexsp.jsonl metrics-static.jsonl ...
Columns: sp-mode, iterations averaged, ms/iteration, planner estimate, tokens/s (total tokens
over total time of the averaged iterations), speedup in tokens/s over `static` (if present),
final loss. The first --skip logged iterations (warm-up) are left out of the averages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"metrics_table: {path}:{n} is not JSON: {e}") from None
    return rows


def summarize(rows: list[dict], skip: int) -> dict:
    use = rows[skip:] if len(rows) > skip else rows[-1:]
    ms = sum(r["iter_ms"] for r in use)
    tokens = sum(r["tokens_per_s"] * r["iter_ms"] / 1000.0 for r in use)
    est = [r["estimated_ms"] for r in use if r.get("estimated_ms") is not None]
    return {
        "mode": rows[-1].get("sp_mode", "?"),
        "n": len(use),
        "ms": ms / len(use),
        "est": sum(est) / len(est) if est else float("nan"),
        "tps": tokens / (ms / 1000.0) if ms > 0 else float("nan"),
        "loss": rows[-1]["loss"],
        "last_iter": rows[-1]["iteration"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--skip", type=int, default=1, help="warm-up iterations left out of the averages (default 1)")
    a = p.parse_args(argv)
    out = []
    for f in a.files:
        if not f.exists():
            print(f"metrics_table: {f} does not exist (that run failed before logging?)", file=sys.stderr)
            continue
        rows = load(f)
        if not rows:
            print(f"metrics_table: {f} is empty", file=sys.stderr)
            continue
        missing = {"iteration", "loss", "tokens_per_s", "iter_ms"} - set(rows[-1])
        if missing:
            raise SystemExit(f"metrics_table: {f} lacks fields {sorted(missing)}")
        out.append(summarize(rows, a.skip))
    if not out:
        print("metrics_table: no metrics to tabulate", file=sys.stderr)
        return 1
    base = next((r["tps"] for r in out if r["mode"] == "static"), None)
    print(f"{'sp-mode':<20}{'iters':>6}{'ms/iter':>11}{'est ms':>10}{'tokens/s':>12}{'vs static':>11}{'final loss':>12}")
    for r in out:
        sp = f"{r['tps'] / base:.2f}x" if base else "-"
        print(f"{r['mode']:<20}{r['n']:>6}{r['ms']:>11.1f}{r['est']:>10.1f}{r['tps']:>12.1f}{sp:>11}{r['loss']:>12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
