"""Faults on 2 gloo ranks, end to end: non-finite steps, SIGTERM, deadlines, finished runs, kills, hangs.

The non-finite test runs the Trainer in-process (tests.dist_utils) and corrupts a gradient after
the real backward; the others launch the real entry point with torchrun and act on its processes
as a cluster would (a signal to the ranks, a SIGKILL, a SIGSTOP). The long ones are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.torchrun_utils import as_flags, kill_tree, losses, rank_pids, tiny_gpt, torchrun

ROOT = Path(__file__).resolve().parents[2]
SMALL = tiny_gpt(
    global_batch_size=4,
    lr="2e-3",
    seed=11,
    mock_data=True,
    mock_data_num_docs=600,
    flexsp_time_limit=0.5,
    no_progress_bar=True,
    flexsp_cost_model="cpu-tiny",
)


# ------------------------------------------------------------------ non-finite steps


def _train_with_bad_grads(rank, world_size, out_dir, bad_steps, max_skipped):
    from megatron.flexsp.training import arguments as A
    from megatron.flexsp.training.configs import configs_from_args
    from megatron.flexsp.training.distributed import launch_env
    from megatron.flexsp.training.resilience import TooManySkippedSteps
    from megatron.flexsp.training.trainer import Trainer

    args = A.parse_args(
        SMALL
        + [
            "--train-iters",
            "5",
            "--flexsp-plan-ahead",
            "0",
            "--flexsp-sharding",
            "ddp",
            "--save",
            f"{out_dir}/ckpt",
            "--ckpt-format",  # the checks below read the full model.pt/optim.pt of the torch format
            "torch",
            "--save-interval",
            "1",
            "--max-skipped-steps",
            str(max_skipped),
            "--metrics-file",
            f"{out_dir}/m.jsonl",
        ]
    )
    env = launch_env()
    trainer = Trainer(configs_from_args(args, env), env)
    real_run, steps = trainer.executor.run, []

    def run(plan, seqs, **kw):
        res = real_run(plan, seqs, **kw)
        if not kw.get("forward_only"):
            steps.append(1)
            if len(steps) in bad_steps and rank == 1:  # one rank's gradient only: the vote must spread it
                next(iter(trainer.model.parameters())).grad.view(-1)[0] = float("inf")
        return res

    trainer.executor.run = run
    try:
        return {
            "records": [(r.iteration, r.loss, r.extra.get("skipped_step", False)) for r in trainer.train()],
            "stopped": None,
        }
    except TooManySkippedSteps as e:
        return {"records": None, "stopped": str(e)}
    finally:
        trainer.close()


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _all_finite(path: Path) -> bool:
    def walk(x):
        if isinstance(x, torch.Tensor):
            return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
        if isinstance(x, dict):
            return all(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(walk(v) for v in x)
        return True

    return all(
        walk(torch.load(f, map_location="cpu", weights_only=True)) for f in (path / "model.pt", path / "optim.pt")
    )


def test_an_inf_gradient_is_skipped_and_never_saved(tmp_path):
    res = run_distributed(_train_with_bad_grads, 2, str(tmp_path), {2}, 3, timeout=240)
    recs = res[0]["records"]
    assert [r[0] for r in recs] == [1, 2, 3, 4, 5]
    assert [r[2] for r in recs] == [False, True, False, False, False]
    ckpts = sorted((tmp_path / "ckpt").glob("iter_*"))
    assert len(ckpts) == 5 and all(_all_finite(c) for c in ckpts)
    # the skipped step changed nothing: the weights after iteration 2 are those after iteration 1
    one, two, three = (_model_state(tmp_path / "ckpt" / f"iter_{i:07d}") for i in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(two[k], three[k]) for k in two)
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x.get("skipped_step", False) for x in lines] == [False, True, False, False, False]


def test_consecutive_non_finite_steps_stop_the_run_with_finite_checkpoints(tmp_path):
    res = run_distributed(_train_with_bad_grads, 2, str(tmp_path), {2, 3, 4, 5}, 2, timeout=240)
    assert res[0]["stopped"] and "2 consecutive non-finite steps" in res[0]["stopped"]
    assert res[1]["stopped"]  # every rank stops alike
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert latest == "iter_0000002"  # iteration 3 raised before its save
    assert all(_all_finite(c) for c in (tmp_path / "ckpt").glob("iter_*"))


# ------------------------------------------------------------------ torchrun helpers


def _torchrun(args, log_path, *, nproc=2, extra_launcher=()):
    return torchrun(args, log_path, nproc=nproc, extra_launcher=extra_launcher)


def _wait_for_iteration(proc, metrics, it, log, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(losses(metrics), default=0) >= it:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early (rc {proc.returncode}):\n{Path(log).read_text()[-3000:]}")
        time.sleep(0.05)
    kill_tree(proc)
    pytest.fail(f"training did not reach iteration {it} in time:\n{Path(log).read_text()[-3000:]}")


def _finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"the job did not end within {timeout} s")


def _resumable(ckpt: Path, save_interval: int) -> list[str]:
    """14 iterations that save to and resume from ``ckpt`` (the length of the ``straight`` run)."""
    return as_flags(train_iters=14, save=ckpt, load=ckpt, save_interval=save_interval)


def _finish_ok(proc, timeout, log_path) -> str:
    """Wait for the job; it must exit 0 (else the test fails with its log's tail). Its log."""
    rc = _finish(proc, timeout)
    log = Path(log_path).read_text()
    assert rc == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 14-iteration run: the reference losses."""
    d = tmp_path_factory.mktemp("straight")
    p = _torchrun(SMALL + ["--train-iters", "14", "--metrics-file", str(d / "m.jsonl")], d / "log")
    _finish_ok(p, 300, d / "log")
    return losses(d / "m.jsonl")


# ------------------------------------------------------------------ signal and deadline


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_sigterm_saves_at_the_next_boundary_exits_zero_and_resumes_exactly(tmp_path, straight):
    ckpt, m1, m2 = tmp_path / "ckpt", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = SMALL + _resumable(ckpt, save_interval=1000) + ["--exit-signal-handler"]
    p = _torchrun(common + ["--metrics-file", str(m1)], tmp_path / "a.log")
    _wait_for_iteration(p, m1, 7, tmp_path / "a.log")
    t0 = time.monotonic()
    for pid in rank_pids(p).values():  # as srun delivers a job's signal to its tasks
        os.kill(pid, signal.SIGTERM)
    log = _finish_ok(p, 60, tmp_path / "a.log")
    assert time.monotonic() - t0 < 30
    last = max(losses(m1))
    assert 7 <= last < 14 and "received SIGTERM" in log
    assert (ckpt / "latest").read_text().strip() == f"iter_{last:07d}"
    q = _torchrun(common + ["--metrics-file", str(m2)], tmp_path / "b.log")
    _finish_ok(q, 300, tmp_path / "b.log")
    got = {**losses(m1), **losses(m2)}
    assert sorted(got) == list(range(1, 15))
    for it, loss in got.items():
        assert loss == pytest.approx(straight[it], rel=2e-5), it
    # a relaunch of the finished run has nothing to do and says so, with success
    r = _torchrun(common + ["--metrics-file", str(tmp_path / "c.jsonl")], tmp_path / "c.log")
    assert "training already finished" in _finish_ok(r, 120, tmp_path / "c.log")


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_exit_duration_saves_and_exits_zero(tmp_path):
    ckpt, m = tmp_path / "ckpt", tmp_path / "m.jsonl"
    p = _torchrun(
        SMALL
        + ["--train-iters", "100000", "--save", str(ckpt), "--exit-duration-in-mins", "0.1", "--metrics-file", str(m)],
        tmp_path / "log",
    )
    log = _finish_ok(p, 240, tmp_path / "log")
    assert "--exit-duration-in-mins reached" in log
    last = max(losses(m))
    assert (ckpt / "latest").read_text().strip() == f"iter_{last:07d}"


# ------------------------------------------------------------------ kill and restart, hang


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(5))
def test_a_killed_rank_is_restarted_in_job_and_resumes(tmp_path, straight, attempt):
    ckpt, m = tmp_path / "ckpt", tmp_path / "m.jsonl"
    p = _torchrun(
        SMALL + _resumable(ckpt, save_interval=5) + ["--metrics-file", str(m)],
        tmp_path / "log",
        extra_launcher=("--max-restarts", "1"),
    )
    _wait_for_iteration(p, m, 7, tmp_path / "log")
    os.kill(rank_pids(p)[1], signal.SIGKILL)
    log = _finish_ok(p, 300, tmp_path / "log")
    assert f"resumed from {ckpt / 'iter_0000005'} at iteration 5" in log
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    final = {}
    for x in lines:  # the restarted attempt re-logs 6.. : the later value is the one that counts
        final[x["iteration"]] = x["loss"]
    assert sorted(final) == list(range(1, 15))
    for it, loss in final.items():
        assert loss == pytest.approx(straight[it], rel=2e-5), it


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    m = tmp_path / "m.jsonl"
    p = _torchrun(
        SMALL + ["--train-iters", "100000", "--distributed-timeout-minutes", "1", "--metrics-file", str(m)],
        tmp_path / "log",
    )
    _wait_for_iteration(p, m, 5, tmp_path / "log")
    pids = rank_pids(p)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        rc = _finish(p, 60 + 60)
    finally:
        try:
            os.kill(pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - t0
    log = (tmp_path / "log").read_text()
    assert rc != 0 and elapsed < 60 + 30, (rc, elapsed, log[-3000:])
    assert "no training progress" in log and "ranks not responding: [1]" in log, log[-3000:]
