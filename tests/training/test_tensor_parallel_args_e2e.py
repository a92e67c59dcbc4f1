"""The trainer at --tensor-model-parallel-size 2 on 4 gloo ranks (2 units of 2) with static plans over units
(--sp-mode static --context-parallel-size 2) trains to the losses of the same run at TP 1 (the independent
reference), and the plans say TP 2. (flexsp plans at TP 2: tests/runtime/test_tensor_parallel_trainer.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.torchrun_utils import tiny_gpt

BASE = tiny_gpt(64, 1024, global_batch_size=8, train_iters=4, lr="2e-3", lr_warmup_iters=1, seed=7)
BASE += ["--flexsp-time-limit", "1", "--no-progress-bar", "--flexsp-plan-ahead", "0"]


def _train(rank: int, world: int, out_dir: str, runs: list[tuple[str, list[str]]]) -> dict:
    from megatron.flexsp.training import arguments as A
    from megatron.flexsp.training.configs import configs_from_args
    from megatron.flexsp.training.distributed import launch_env
    from megatron.flexsp.training.loop import train

    res = {}
    for name, extra in runs:  # one TP size per process group: megatron's TP groups are made once
        args = A.parse_args([*BASE, *extra, "--flexsp-dump-plans", os.path.join(out_dir, name)])
        env = launch_env()
        res[name] = [r.loss for r in train(configs_from_args(args, env), env)]
    return res


@pytest.mark.slow  # two 4-rank trainings, ~50 s on 2 cores
def test_tp2_static_trains_like_tp1(tmp_path):
    tp2 = ["--tensor-model-parallel-size", "2"]
    runs = [("tp2-static", [*tp2, "--sp-mode", "static", "--context-parallel-size", "2"])]
    got = run_distributed(_train, 4, str(tmp_path), runs, timeout=400)[0]
    ref = run_distributed(_train, 4, str(tmp_path), [("tp1", [])], timeout=400)[0]["tp1"]
    for name in ("tp2-static",):
        assert len(got[name]) == len(ref) == 4
        for a, b in zip(got[name], ref):
            assert a == pytest.approx(b, rel=1e-5), name
        plans = sorted(Path(tmp_path, name).glob("*.json"))
        assert plans
        for p in plans:
            d = json.loads(p.read_text())
            d = d.get("plan", d)
            assert d["tensor_parallel_size"] == 2 and d["world_size"] == 4
            assert all(r in (0, 1) for mb in d["micro_batches"] for g in mb["groups"] for r in g["ranks"])
