"""The trainer at TP 2 (issue 20): 4 gloo ranks as 2 units of 2, planned over units, against the same run at
TP 1 (planned over 4 GPUs, no TP layers), which the other end-to-end tests check against a 1-process model.

The plans differ (units vs GPUs) but the loss is the global token mean of the same batches and the
gradient norm counts every parameter once, so losses and norms must agree step by step. The TP 2 run's
checkpoint (torch_dist, the default) resumes at TP 1 with the uninterrupted run's losses and norms.
"""

from __future__ import annotations

import os

import pytest

from tests.dist_utils import run_distributed
from tests.torchrun_utils import tiny_gpt

ITERS = 4
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
    flexsp_plan_ahead=0,
)


def _train(rank, world_size, t, out_dir, extra=()):
    from megatron.flexsp.training import arguments as A
    from megatron.flexsp.training.configs import configs_from_args
    from megatron.flexsp.training.distributed import launch_env
    from megatron.flexsp.training.loop import train

    metrics = os.path.join(out_dir, f"tp{t}-{len(extra)}.jsonl")
    args = A.parse_args(BASE + ["--tensor-model-parallel-size", str(t), "--metrics-file", metrics, *extra])
    env = launch_env()
    records = train(configs_from_args(args, env), env)
    return [(r.iteration, r.loss, r.grad_norm) for r in records]


@pytest.mark.slow  # three 4-rank trainings: ~2 min on 2 cores
def test_trainer_tp2_equals_tp1_and_its_checkpoint_resumes_at_tp1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    tp1 = run_distributed(_train, 4, 1, str(tmp_path), timeout=400)[0]
    tp2 = run_distributed(_train, 4, 2, str(tmp_path), ["--save", ckpt, "--save-interval", "2"], timeout=400)[0]
    resumed = run_distributed(_train, 4, 1, str(tmp_path), ["--load", ckpt, "--load-step", "2"], timeout=400)[0]
    assert [r[0] for r in resumed] == [3, 4]
    for (_, l2, g2), (_, lr, gr) in zip(tp2[2:], resumed):
        assert lr == pytest.approx(l2, rel=1e-5)  # the TP 2 checkpoint holds the whole model and its moments
        assert gr == pytest.approx(g2, rel=1e-5)
    assert [r[0] for r in tp2] == [r[0] for r in tp1] == list(range(1, ITERS + 1))
    for (_, l1, g1), (_, l2, g2) in zip(tp1, tp2):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert g2 == pytest.approx(g1, rel=1e-5)  # each parameter once: TP partitions summed over the unit
    assert abs(tp1[-1][1] - tp1[0][1]) > 1e-2  # the run trained: equal losses are not equal constants
