"""End-to-end training on 4 gloo ranks: every sp-mode, same losses; kill-and-resume; entry point.

All modes run inside one set of 4 processes (tests.dist_utils, planning inline) to keep CI
fast; the kill-and-resume test launches the real entry point with torchrun (background
planner process, broadcast, checkpoints) and SIGKILLs it mid-run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port, run_distributed
from tests.torchrun_utils import kill_tree, losses, tiny_gpt, torchrun

ROOT = Path(__file__).resolve().parents[2]
MODES = ("flexsp", "static", "batch-adaptive", "megatron-hybrid-cp", "megatron-dynamic-cp")
ITERS = 6
BASE = tiny_gpt(
    64,
    1024,
    global_batch_size=8,
    train_iters=ITERS,
    lr="2e-3",
    lr_warmup_iters=1,
    seed=7,
    flexsp_time_limit=1,
    no_progress_bar=True,
)


def _train_modes(rank, world_size, out_dir):
    from megatron.flexsp.training import arguments as A
    from megatron.flexsp.training.configs import configs_from_args
    from megatron.flexsp.training.distributed import launch_env
    from megatron.flexsp.training.loop import train

    res = {}
    for mode in MODES:
        metrics = os.path.join(out_dir, f"{mode}.jsonl")
        extra = {
            "batch-adaptive": ["--eval-interval", "3", "--eval-iters", "1"],
            # paired baseline steps run before or after the real one; their gradients must not leak
            "flexsp": ["--flexsp-compare-with", "static"],
        }.get(mode, [])
        args = A.parse_args(
            BASE
            + extra
            + [
                "--sp-mode",
                mode,
                "--metrics-file",
                metrics,
                "--flexsp-plan-ahead",
                "0",
                "--flexsp-dump-plans",
                os.path.join(out_dir, f"plans-{mode}"),
            ]
        )
        env = launch_env()
        records = train(configs_from_args(args, env), env)
        res[mode] = [(r.iteration, r.loss, r.grad_norm, r.lr) for r in records]
    return res


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes")
    results = run_distributed(_train_modes, 4, str(out), timeout=400)
    return out, results[0]


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_every_mode_trains_with_the_samelosses(mode_runs):
    out, res = mode_runs
    ref = res["flexsp"]
    assert [r[0] for r in ref] == list(range(1, ITERS + 1))
    for mode in MODES:
        got = res[mode]
        assert len(got) == ITERS, mode
        for (it, loss, gn, lr), (_, rl, rgn, rlr) in zip(got, ref):
            # exact loss: only the schedule differs, so only float summation order can differ
            assert loss == pytest.approx(rl, rel=2e-5, abs=1e-6), (mode, it)
            assert gn == pytest.approx(rgn, rel=1e-3), (mode, it)
            assert lr == rlr
    assert ref[-1][1] < ref[0][1]  # real text: the loss falls
    # metrics files carry the documented fields, one line per iteration
    from megatron.flexsp.planner.plan import Plan, validate_plan
    from megatron.flexsp.planner.presets import preset

    cost = preset("cpu-tiny")
    for mode in MODES:
        lines = [json.loads(x) for x in (out / f"{mode}.jsonl").read_text().splitlines()]
        valid = [x for x in lines if "valid_loss" in x]
        lines = [x for x in lines if "valid_loss" not in x]
        if mode == "flexsp":  # the paired static step saw the same batch and weights: same loss
            for x in lines:
                assert x["baseline_mode"] == "static" and x["baseline_exec_ms"] > 0
                assert x["baseline_loss"] == pytest.approx(x["loss"], rel=2e-5)
            assert {x["baseline_first"] for x in lines} == {True, False}
        if mode == "batch-adaptive":  # validation every 3 iterations, on real text: a sane loss
            assert [x["iteration"] for x in valid] == [3, 6]
            assert all(0 < x["valid_loss"] < 6.0 for x in valid)
        else:
            assert valid == []
        assert [x["iteration"] for x in lines] == list(range(1, ITERS + 1))
        for x in lines:
            for key in (
                "iteration",
                "loss",
                "lr",
                "grad_norm",
                "tokens_per_s",
                "iter_ms",
                "estimated_ms",
                "micro_batches",
                "sp_mode",
            ):
                assert key in x, (mode, key)
            assert x["sp_mode"] == mode and x["tokens_per_s"] > 0 and x["micro_batches"] >= 1
        plans = sorted((out / f"plans-{mode}").glob("plan_*.json"))
        assert len(plans) == ITERS
        for p, x in zip(plans, lines):
            plan = Plan.load(p)
            validate_plan(plan, cost, world_size=4)
            assert plan.solver.method == mode or mode == "flexsp"
            assert plan.num_micro_batches == x["micro_batches"]
            assert sum(plan.lengths) == x["tokens"]
            if mode == "static":  # vanilla CP: one degree for every group
                assert len({g.degree for mb in plan.micro_batches for g in mb.groups}) == 1
    # all modes read the same documents in the same order
    lens = {m: [Plan.load(p).lengths for p in sorted((out / f"plans-{m}").glob("plan_*.json"))] for m in MODES}
    assert all(lens[m] == lens["flexsp"] for m in MODES)


def _torchrun(args, log_path, port):
    return torchrun(args, log_path, nproc=4, port=port)


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_kill_and_resume_gives_the_samelosses(mode_runs, tmp_path):
    _, res = mode_runs
    straight = {it: loss for it, loss, _, _ in res["flexsp"]}
    ckpt, m1, m2 = tmp_path / "ckpt", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = BASE + ["--sp-mode", "flexsp", "--flexsp-plan-ahead", "2", "--save", str(ckpt), "--save-interval", "2"]
    # --load = --save with no checkpoint yet: the auto-resume pattern starts from scratch
    p = _torchrun(
        common
        + ["--train-iters", "40", "--lr-decay-iters", str(ITERS), "--metrics-file", str(m1), "--load", str(ckpt)],
        tmp_path / "a.log",
        free_port(),
    )
    # the lr schedule above keeps --lr-decay-iters of the reference run, so only the kill differs
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if m1.exists() and max(losses(m1), default=0) >= 3 and (ckpt / "latest").exists():
                break
            if p.poll() is not None:
                pytest.fail(f"training exited early (rc {p.returncode}):\n{(tmp_path / 'a.log').read_text()[-3000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("training did not reach iteration 3 in time")
    finally:
        kill_tree(p)
    assert "starting from scratch" in (tmp_path / "a.log").read_text()
    saved = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert saved >= 2 and saved % 2 == 0
    q = _torchrun(
        common + ["--train-iters", str(ITERS), "--load", str(ckpt), "--metrics-file", str(m2)],
        tmp_path / "b.log",
        free_port(),
    )
    try:
        rc = q.wait(timeout=300)
    finally:
        if q.poll() is None:
            kill_tree(q)
    log = (tmp_path / "b.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"resumed from {ckpt / f'iter_{saved:07d}'} at iteration {saved}" in log
    resumed = losses(m2)
    assert sorted(resumed) == list(range(saved + 1, ITERS + 1))
    first = losses(m1)
    for it in range(1, saved + 1):
        assert first[it] == pytest.approx(straight[it], rel=2e-5, abs=1e-6)
    for it, loss in resumed.items():
        assert loss == pytest.approx(straight[it], rel=2e-5, abs=1e-6), it
    assert (ckpt / "latest").read_text().strip() == f"iter_{ITERS:07d}"  # final save
