"""flexsp-plan end to end (small and fast): outputs, table numbers, overlong handling, clear errors."""

import csv
import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from megatron.flexsp.planner.api import METHODS
from megatron.flexsp.planner.bounds import lower_bound_ms
from megatron.flexsp.planner.cli import iter_batches, main
from megatron.flexsp.planner.plan import Plan, estimate_plan_ms, validate_plan
from megatron.flexsp.planner.presets import preset

FAST = ["--cost-model", "cpu-tiny", "--world-size", "4", "--global-batch-size", "12", "--time-limit", "0.2", "--quiet"]


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in METHODS:
            rows[parts[0]] = parts[1:]
    return rows


def test_synthetic_run_writes_valid_plans_summary_and_plots(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = main(
        ["--synthetic", "400", "--max-seq-len", "1500", "--iters", "3", "--output", str(out_dir), "--plot", *FAST]
    )
    assert rc == 0
    out = capsys.readouterr().out
    cost = preset("cpu-tiny")
    methods = list(METHODS)  # every peer by default, megatron-dynamic-cp included
    means, mbs = {}, {}
    for m in methods:
        files = sorted((out_dir / "plans" / m).glob("iter_*.json"))
        assert [f.name for f in files] == ["iter_0000.json", "iter_0001.json", "iter_0002.json"]
        plans = [Plan.load(f) for f in files]
        for p in plans:
            validate_plan(p, cost, world_size=4, num_sequences=12)
            assert p.solver.method == m
        means[m] = statistics.fmean(estimate_plan_ms(p, cost) for p in plans)
        mbs[m] = statistics.fmean(len(p.micro_batches) for p in plans)
        for k in range(3):
            assert (out_dir / "plots" / f"{m}_iter_{k:04d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed table agrees with an estimate recomputed from the saved plans
    rows = _table_rows(out)
    assert set(rows) == set(methods)
    for m in methods:
        assert float(rows[m][0]) == pytest.approx(means[m], abs=0.06)
        ratio_to_lb = statistics.fmean(
            estimate_plan_ms(p, cost) / lower_bound_ms(p.lengths, cost, 4)
            for p in (Plan.load(f) for f in sorted((out_dir / "plans" / m).glob("iter_*.json")))
        )
        assert rows[m][1] == f"{ratio_to_lb:.3f}x"
        assert rows[m][2] == f"{means['static'] / means[m]:.2f}x"
        assert rows[m][3] == f"{means[m] / means['flexsp']:.2f}x"  # what flexsp gains over this peer
        assert rows[m][4] == f"{mbs[m]:.1f}"
    assert rows["static"][2] == "1.00x" and rows["flexsp"][3] == "1.00x"
    kept = sum(Plan.load(f).solver.extra["chosen"] == "solver" for f in (out_dir / "plans" / "flexsp").glob("*.json"))
    assert f"flexsp: the solver's plan was kept in {kept}/3 batches" in out
    assert means["flexsp"] <= means["static"] + 1e-6 and means["flexsp"] <= means["batch-adaptive"] + 1e-6
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [r["method"] for r in summary["methods"]] == methods
    assert summary["world_size"] == 4 and summary["num_sequences"] == 400
    with open(out_dir / "summary.csv") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 3 * len(methods)
    first = next(r for r in recs if r["method"] == "static" and r["iter"] == "0")
    p0 = Plan.load(out_dir / "plans" / "static" / "iter_0000.json")
    assert float(first["estimated_ms"]) == pytest.approx(p0.estimated_time_ms, abs=1e-3)
    assert int(first["micro_batches"]) == p0.num_micro_batches


def test_batches_come_from_the_file_in_seeded_order(tmp_path, capsys):
    lengths = np.arange(1, 31) * 40  # 40..1200, all distinct
    path = tmp_path / "l.npy"
    np.save(path, lengths)
    out_dir = tmp_path / "o"
    assert main([str(path), "--iters", "4", "--methods", "static", "--output", str(out_dir), "--seed", "7", *FAST]) == 0
    idx = list(iter_batches(30, 12, 4, 7))
    for k in range(4):
        p = Plan.load(out_dir / "plans" / "static" / f"iter_{k:04d}.json")
        assert p.lengths == lengths[idx[k]].tolist()
    # the stream walks through whole epochs: the first 30 drawn indices are a permutation
    assert sorted(np.concatenate(idx)[:30].tolist()) == list(range(30))


@pytest.mark.parametrize("mode,expect", [("truncate", "3 truncated, 0 dropped"), ("drop", "0 truncated, 3 dropped")])
def test_overlong_counted_and_reported(tmp_path, capsys, mode, expect):
    path = tmp_path / "l.txt"
    path.write_text("\n".join(str(x) for x in [100, 5000, 200, 300, 9000, 400, 700, 1600]) + "\n")
    assert (
        main([str(path), "--max-seq-len", "1500", "--overlong", mode, "--iters", "1", "--methods", "static", *FAST])
        == 0
    )
    assert expect in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,match",
    [
        (["--iters", "1"], "give exactly one length source"),
        (["--synthetic", "10", "LENGTHS.txt"], "give exactly one length source"),
        (["--synthetic", "10", "--methods", "flexsp,ulysses"], r"--methods: unknown \['ulysses'\]"),
        (["--synthetic", "10", "--plot"], "--plot needs --output DIR"),
        (["--synthetic", "10", "--cost-model", "gpt-99b"], "unknown cost-model preset 'gpt-99b'"),
        (
            ["--synthetic", "10", "--cost-model", "gpt-7b", "--world-size", "12"],
            "world size 12 is not a multiple of gpus_per_node 8",
        ),
        (["/nonexistent/lengths.txt"], "lengths file not found: /nonexistent/lengths.txt"),
        (["--synthetic", "10", "--global-batch-size", "0"], "--global-batch-size must be >= 1"),
        (["--synthetic", "10", "--time-limit", "0"], "--time-limit must be > 0"),
    ],
)
def test_bad_input_is_a_clear_error(args, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_overlong_error_mode_and_infeasible_lengths(tmp_path, capsys):
    path = tmp_path / "l.txt"
    path.write_text("100\n5000\n")
    with pytest.raises(SystemExit):
        main([str(path), "--max-seq-len", "1500", "--overlong", "error", *FAST])
    assert "1 sequence(s) longer than the max length 1500: first is #1 with 5000 tokens" in capsys.readouterr().err
    # 5000 tokens fit no group of cpu-tiny on 4 ranks (4 x 512 tokens): a clear error, exit code 1
    assert main([str(path), "--iters", "1", *FAST]) == 1
    assert "no feasible plan on 4 ranks" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    exe = [sys.executable, "-m", "megatron.flexsp.planner.cli"]
    r = subprocess.run(
        [
            *exe,
            "--synthetic",
            "100",
            "--max-seq-len",
            "1500",
            "--iters",
            "2",
            "--methods",
            "static,batch-adaptive",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "batch-adaptive" in r.stdout and "vs static" in r.stdout


def test_explain_prints_every_batch_and_the_mean(capsys):
    assert main(["--synthetic", "200", "--max-seq-len", "1500", "--iters", "2", "--explain", *FAST]) == 0
    out = capsys.readouterr().out
    assert "batch 0:" in out and "batch 1:" in out and "mean over 2 batch(es):" in out
    assert out.count("megatron-dynamic-cp") >= 4  # the main table, two batches, the mean
