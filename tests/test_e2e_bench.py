"""benchmarks/e2e_bench.py: its pure parts against hand-computed numbers (no training here).

Why: the benchmark's headline (median of per-pair flexsp/static ratios), its per-run figures
(medians after summary.py's warm-up, estimate errors, planner share) and its loss-equality
verdict decide what the README quotes; a wrong median or a warm-up off by one would go unseen
in a table of plausible numbers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.flexsp.training.summary import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "e2e_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("e2e_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["e2e_bench"] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


eb = _load()


def _rec(it, tokens, ms, loss, mode, est, compute, solve=0.0, wait=0.0, **kw):
    return dict(
        {
            "iteration": it,
            "loss": loss,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens": tokens,
            "tokens_per_s": tokens / (ms / 1e3),
            "iter_ms": ms,
            "estimated_ms": est,
            "micro_batches": 2,
            "sp_mode": mode,
            "groups_by_degree": {"1": 4},
            "a2a_ms": 10.0,
            "compute_ms": compute,
            "plan_source": "planner",
            "plan_wait_ms": wait,
            "solve_time_s": solve,
            "num_sequences": 32,
        },
        **kw,
    )


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in recs) + json.dumps({"iteration": 5, "valid_loss": 3.0}) + "\n"
    )
    return path


def test_run_stats_from_metrics_file(tmp_path):
    # 5 iterations: summary.warmup_count(5) = 1, so iteration 1 (slow) is left out of every median
    recs = [
        _rec(1, 4000, 4000.0, 9.0, "flexsp", est=100.0, compute=900.0, solve=2.0, wait=50.0),
        _rec(2, 1000, 100.0, 8.0, "flexsp", est=120.0, compute=80.0, solve=0.02, wait=1.0),  # tok/s 10000
        _rec(3, 3000, 200.0, 7.0, "flexsp", est=150.0, compute=150.0, solve=0.04, wait=3.0),  # 15000
        _rec(4, 2000, 400.0, 6.0, "flexsp", est=500.0, compute=250.0, solve=0.10, wait=2.0),  # 5000
        _rec(5, 4000, 200.0, 5.5, "flexsp", est=100.0, compute=125.0, solve=0.04, wait=4.0),  # 20000
    ]
    s = eb.run_stats(read_metrics(_write(tmp_path / "f.jsonl", recs)), "F1")
    assert (s.iterations, s.warmup, s.measured_iterations, s.sp_mode) == (5, 1, 4, "flexsp")
    assert s.tokens_per_s == pytest.approx(12500.0)  # median of 10000, 15000, 5000, 20000
    assert s.iter_ms == pytest.approx(200.0)  # median of 100, 200, 400, 200
    assert s.estimated_ms == pytest.approx(135.0)  # median of 120, 150, 500, 100
    # |est - iter| / iter: 0.2, 0.25, 0.25, 0.5 -> 0.25
    assert s.est_err_iter == pytest.approx(0.25)
    # |est - compute| / compute: 0.5, 0, 1.0, 0.2 -> 0.35
    assert s.est_err_fwd_bwd == pytest.approx(0.35)
    # solve 0.2 s over 0.9 s of iterations; per iteration 0.2, 0.2, 0.25, 0.2 -> median 0.2
    assert s.planner_wall_share == pytest.approx(0.2 / 0.9)
    assert s.planner_wall_share_median == pytest.approx(0.2)
    assert s.planner_cpu_share is None  # the records have no planner_cpu_s
    assert s.plan_wait_ms == pytest.approx(2.5)
    assert s.final_loss == 5.5 and s.losses == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0, 5: 5.5}
    assert s.tokens_per_s_time_weighted == pytest.approx(10000 / 0.9)  # summary.py's total tokens / total time


def test_planner_cpu_share_when_recorded():
    recs = [
        _rec(i, 1000, 250.0, 5.0, "flexsp", est=250.0, compute=200.0, solve=0.1, planner_cpu_s=0.05)
        for i in range(1, 4)
    ]
    s = eb.run_stats(recs, "F")
    assert s.warmup == 1 and s.planner_cpu_share == pytest.approx(0.2)
    assert s.planner_wall_share == pytest.approx(0.4)
    assert s.est_err_iter == 0.0 and s.est_err_fwd_bwd == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no training iterations"):
        eb.run_stats([{"iteration": 1, "valid_loss": 2.0}], "empty")


def test_loss_difference_check():
    a = {1: 10.0, 2: 8.0, 3: 4.0}
    assert eb.max_rel_loss_diff(a, dict(a)) == (0.0, 1)
    d, where = eb.max_rel_loss_diff(a, {1: 10.0, 2: 8.0 + 8e-6, 3: 4.0 + 2e-6})
    assert where == 2 and d == pytest.approx(8e-6 / (8.0 + 8e-6))  # about 1e-6 relative, 5e-7 at iteration 3
    assert eb.max_rel_loss_diff(a, {1: 10.0, 2: 8.0}) == (float("inf"), None)  # different iterations
    assert eb.max_rel_loss_diff({1: float("nan")}, {1: 1.0})[0] == float("inf")


def test_pairs_ratios_and_median_headline():
    def stats(name, mode, tps, losses, tw=None):
        return eb.RunStats(
            name=name,
            sp_mode=mode,
            iterations=3,
            warmup=1,
            measured_iterations=2,
            tokens_per_s=tps,
            iter_ms=100.0,
            estimated_ms=None,
            est_err_iter=None,
            est_err_fwd_bwd=None,
            planner_wall_share=None,
            planner_wall_share_median=None,
            planner_cpu_share=None,
            plan_wait_ms=0.0,
            final_loss=losses[3],
            losses=losses,
            tokens_per_s_time_weighted=tps if tw is None else tw,
            a2a_share=0.0,
            micro_batches=1.0,
            fallback_plans=0,
        )

    same = {1: 10.0, 2: 9.0, 3: 8.0}
    off = {1: 10.0, 2: 9.0, 3: 8.0 * (1 + 3e-6)}
    pairs = [
        eb.pair_result(1, stats("S1", "static", 1000.0, same), stats("F1", "flexsp", 900.0, same, tw=800.0)),
        eb.pair_result(2, stats("S2", "static", 1000.0, same), stats("F2", "flexsp", 1120.0, same, tw=700.0)),
        eb.pair_result(3, stats("S3", "static", 800.0, same), stats("F3", "flexsp", 728.0, off)),
    ]
    assert [p.ratio for p in pairs] == pytest.approx([0.90, 1.12, 0.91])
    # total tokens / total time can disagree with the median (few iterations, batches of different sizes)
    assert [p.ratio_time_weighted for p in pairs] == pytest.approx([0.80, 0.70, 0.91])
    h = eb.headline(pairs)
    assert h["median_ratio"] == pytest.approx(0.91)  # the 0.90, 1.12, 0.91 -> median 0.91
    assert (h["min_ratio"], h["max_ratio"]) == (pytest.approx(0.90), pytest.approx(1.12))
    assert pairs[0].loss_ok and not pairs[2].loss_ok and pairs[2].worst_iteration == 3
    assert h["max_rel_loss_diff"] == pytest.approx(3e-6 / (1 + 3e-6)) and h["loss_ok"] is False
    table = eb.pairs_table(pairs)
    assert "0.910x" in table and "EXCEEDS" in table
    assert eb.headline(pairs[:2])["median_ratio"] == pytest.approx(1.01)  # even count: mean of the middle two
    assert h["median_ratio_time_weighted"] == pytest.approx(0.80)


def test_parsers_and_launch_lines():
    assert eb.parse_topology("2x1") == (2, 1) and eb.parse_topology("2X2") == (2, 2)
    for bad in ("2", "0x2", "axb", "2x2x2"):
        with pytest.raises(ValueError):
            eb.parse_topology(bad)
    la = eb.parse_loadavg("3.77 5.84 3.35 7/124 22915\n")
    assert la == {"load1": 3.77, "load5": 5.84, "load15": 3.35, "runnable": 7, "tasks": 124}
    assert eb.tbf_burst_bytes(200) == 100000 and eb.tbf_burst_bytes(10) == 65536
    with pytest.raises(ValueError, match="--iters"):
        eb.check_extra_flags(["--train-iters=5"])
    with pytest.raises(ValueError, match="standalone"):
        eb.check_extra_flags(["--flexsp-compare-with", "static"])
    eb.check_extra_flags(["--flexsp-time-limit", "0.05"])

    cfg = eb.BenchConfig(nodes=2, ranks_per_node=1, data="stdlib", iters=5, extra=["--flexsp-time-limit", "0.05"])
    cmd = eb.run_command(cfg, "emulated", "py", "flexsp", "/m.jsonl")
    i = cmd.index("--")
    assert cmd[:i] == [
        "bash",
        str(ROOT / "scripts" / "emulated_cluster.sh"),
        "--nodes",
        "2",
        "--gpus-per-node",
        "1",
        "--link-mbit",
        "200",
        "--latency-ms",
        "0",
        "--timeout",
        "1800",
    ]
    flags = cmd[i + 2 :]
    assert cmd[i + 1] == "pretrain_gpt_flexsp.py" and "--mock-data" not in flags
    assert flags[-8:] == [
        "--train-iters",
        "5",
        "--log-interval",
        "1",
        "--sp-mode",
        "flexsp",
        "--metrics-file",
        "/m.jsonl",
    ]
    assert flags[flags.index("--flexsp-cost-model") + 1] == "cpu-tiny-ddp" and "--flexsp-time-limit" in flags
    host = eb.run_command(eb.BenchConfig(), "host", "py", "static", "/s.jsonl", port=1234)
    assert (
        host[:8]
        == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port"]
        and "--mock-data" in host
    )
    assert "--flexsp-cost-model" not in eb.trainer_flags(eb.BenchConfig(cost_model="none"), "static", "/x")


def test_help_and_dry_run():
    p = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--pairs" in p.stdout and "--topology" in p.stdout
    p = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--cluster",
            "host",
            "--topology",
            "2x1",
            "--dry-run",
            "--",
            "--flexsp-time-limit",
            "0.05",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "FALLBACK to plain torchrun on ONE host, 2 ranks" in p.stdout
    assert "--sp-mode static" in p.stdout and "--sp-mode flexsp" in p.stdout
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--", "--sp-mode", "static"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "cannot be passed through" in p.stderr
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--cluster", "host", "--baseline", "megatron-dynamic-cp", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "megatron-dynamic-cp vs flexsp" in p.stdout and "alternating M F M F M F" in p.stdout
    assert "--sp-mode megatron-dynamic-cp" in p.stdout and "--sp-mode static" not in p.stdout


def _head(ratios, tw=None):
    """A headline from per-pair ratios, built by hand (the reference for verdict)."""
    tw = ratios if tw is None else tw
    return {
        "ratios": ratios,
        "ratios_time_weighted": tw,
        "median_ratio": sorted(ratios)[len(ratios) // 2],
        "median_ratio_time_weighted": sorted(tw)[len(tw) // 2],
    }


@pytest.mark.parametrize(
    "tw, word",
    [
        ([0.82, 1.19, 1.05], "a tie"),  # the two fresh-clone quickstarts of issue 15, plus one
        ([1.03, 1.10, 1.31], "faster"),
        ([1.02, 1.10, 1.31], "a tie"),  # 1.02 does not clear the 2% margin
        ([0.90, 0.95, 0.97], "slower"),
        ([0.90, 0.95, 0.99], "a tie"),
        ([1.0, 1.2, 1.3], "a tie"),  # a pair exactly at 1.0 is inside the spread
        ([1.007, 1.008, 1.090], "a tie"),  # a fresh quickstart: two pairs within 2% of 1.0 are no evidence
        ([1.021, 1.03, 1.2], "faster"),
        ([0.97, 0.975, 0.979], "slower"),
    ],
)
def test_verdict_follows_the_spread_of_the_headline_ratios(tw, word):
    # the per-iteration ratios point the other way on purpose: the verdict reads the headline ones
    line = eb.verdict(_head([1.5, 1.6, 1.7], tw), ranks=4, cpus=2)
    assert line.startswith("VERDICT:") and word in line
    assert f"median {sorted(tw)[1]:.3f}x" in line
    if word == "a tie":
        assert "within noise" in line and "4 CPU ranks oversubscribe 2 cores" in line


def test_verdict_with_one_pair_asks_for_more():
    line = eb.verdict(_head([1.3]), ranks=4, cpus=2)
    assert "no spread" in line and "faster" not in line


def test_verdict_and_pairs_table_name_the_baseline():
    line = eb.verdict(_head([1.1, 1.2, 1.3]), ranks=4, cpus=2, baseline="megatron-dynamic-cp")
    assert "faster than megatron-dynamic-cp" in line
    assert eb.pairs_table([], "megatron-hybrid-cp").startswith("A = megatron-hybrid-cp")
