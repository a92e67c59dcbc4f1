"""Does online calibration make the planner's estimate true? Estimated vs measured ms per iteration.

Why: the planner's estimate is a claim about reality; a cost model profiled on another day, machine
or model is off, and the planner then optimises against fiction. This benchmark starts a FlexSP
training run from a deliberately wrong cost model (compute x ``--compute-scale``, all-to-all
bandwidth x ``--bandwidth-scale``; the issue's case is x0.3 and x3) once with ``--flexsp-calibrate
on`` and once ``off``, on the emulated cluster (as ``e2e_bench.py`` launches it), and prints per
iteration the plan's estimate next to the measured forward+backward time and the whole iteration,
then the median relative error over a window of late iterations (default 8-16).

    .venv/bin/python benchmarks/calibration_bench.py                      # 2x2 emulated, mock data, 16 iterations
    .venv/bin/python benchmarks/calibration_bench.py --compute-scale 1 --bandwidth-scale 1   # a matching profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_bench as E  # noqa: E402  (the sibling benchmark's launchers, so both run jobs the same way)

ROOT = Path(__file__).resolve().parents[1]


def distorted_cost_model(preset: str, compute_scale: float, bandwidth_scale: float, world_size: int) -> dict[str, Any]:
    """The preset's JSON with every compute coefficient and every bandwidth scaled."""
    sys.path.insert(0, str(ROOT))
    from megatron.flexsp.planner.presets import load_cost_model

    d = load_cost_model(preset, world_size).to_dict()
    d["name"] = f"{d['name']} (compute x{compute_scale:g}, bandwidth x{bandwidth_scale:g})"
    d["compute"] = {k: v * compute_scale for k, v in d["compute"].items()}
    d["alltoall"]["bandwidth_gbs"] = {k: v * bandwidth_scale for k, v in d["alltoall"]["bandwidth_gbs"].items()}
    return d


def window_errors(records: Sequence[dict[str, Any]], first: int, last: int) -> dict[str, float | None]:
    """Median |estimate - measured| / measured over iterations first..last, against f+b and against the iteration."""
    rows = [r for r in records if first <= r["iteration"] <= last and r.get("estimated_ms")]

    def med(key: str) -> float | None:
        errs = [abs(r["estimated_ms"] - r[key]) / r[key] for r in rows if r.get(key)]
        return statistics.median(errs) if errs else None

    return {"vs_fwd_bwd": med("compute_ms"), "vs_iteration": med("iter_ms"), "iterations": len(rows)}


def read_records(path: Path) -> list[dict[str, Any]]:
    return [x for x in map(json.loads, path.read_text().splitlines()) if "loss" in x]


def _table(name: str, records: Sequence[dict[str, Any]]) -> str:
    lines = [f"{name}", f"  {'it':>3} {'est ms':>9} {'f+b ms':>9} {'iter ms':>9} {'err f+b':>8} {'alpha2':>10}"]
    for r in records:
        est, fb = r.get("estimated_ms") or 0.0, r.get("compute_ms") or 0.0
        err = f"{100 * abs(est - fb) / fb:7.1f}%" if fb else "      -"
        a2 = r.get("cost_alpha2")
        lines.append(
            f"  {r['iteration']:>3} {est:>9.1f} {fb:>9.1f} {r['iter_ms']:>9.1f} {err} "
            f"{'-' if a2 is None else f'{a2:.4g}':>10}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="2x2", help="NODESxRANKS (default 2x2)")
    p.add_argument("--data", choices=["mock", "stdlib"], default="mock")
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--window", default="8-16", help="iterations whose median error is reported (default 8-16)")
    p.add_argument("--compute-scale", type=float, default=0.3)
    p.add_argument("--bandwidth-scale", type=float, default=3.0)
    p.add_argument("--cost-model", default="cpu-tiny-ddp", help="the preset to distort (default cpu-tiny-ddp)")
    p.add_argument("--cluster", choices=["auto", "emulated", "host"], default="auto")
    p.add_argument("--link-mbit", type=int, default=200)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    nodes, per_node = E.parse_topology(args.topology)
    first, last = (int(x) for x in args.window.split("-"))
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="flexsp-calibration-"))
    out.mkdir(parents=True, exist_ok=True)
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
    cost = distorted_cost_model(args.cost_model, args.compute_scale, args.bandwidth_scale, nodes * per_node)
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    results: dict[str, Any] = {}
    for calibrate in ("on", "off"):
        cfg = E.BenchConfig(
            pairs=1,
            nodes=nodes,
            ranks_per_node=per_node,
            data=args.data,
            iters=args.iters,
            link_mbit=args.link_mbit,
            cluster=args.cluster,
            cost_model=str(out / "cost.json"),
            extra=["--flexsp-calibrate", calibrate],
        )
        kind, why = E.choose_cluster(cfg, python)
        if calibrate == "on":
            print("\n".join(E.cluster_description(cfg, kind, why)))
            print(f"starting cost model: {cost['name']}; load average before: {E.read_loadavg()}")
        metrics = out / f"calibrate-{calibrate}.jsonl"
        rc = E.launch(
            E.run_command(cfg, kind, python, "flexsp", str(metrics), E.free_port()),
            out / f"calibrate-{calibrate}.log",
            python,
            cfg.run_timeout_s,
        )
        if rc != 0:
            print(f"calibrate {calibrate}: run failed (rc {rc}); log {out / f'calibrate-{calibrate}.log'}")
            return 1
        records = read_records(metrics)
        results[calibrate] = window_errors(records, first, last)
        print(_table(f"--flexsp-calibrate {calibrate}", records))
    print(f"load average after: {E.read_loadavg()}")
    print(f"median relative error of the plan's estimate over iterations {first}-{last}:")
    for k, v in results.items():
        fb, it = v["vs_fwd_bwd"], v["vs_iteration"]
        print(
            f"  calibrate {k:<3}: vs forward+backward {'-' if fb is None else f'{100 * fb:.1f}%'}, "
            f"vs whole iteration {'-' if it is None else f'{100 * it:.1f}%'} ({v['iterations']} iterations)"
        )
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"logs and metrics: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
