"""Metrics logging: JSONL records, TensorBoard scalars (fake writer), console line, rank 0 only."""

from __future__ import annotations

import json
import sys
import types

from megatron.flexsp.training.configs import LoggingConfig
from megatron.flexsp.training.logging_utils import IterationRecord, MetricsLogger, format_line


def _rec(it: int) -> IterationRecord:
    return IterationRecord(
        iteration=it,
        loss=5.0 - it,
        lr=1e-3,
        grad_norm=0.5,
        tokens=4000,
        iter_ms=500.0,
        estimated_ms=400.0,
        micro_batches=3,
        sp_mode="flexsp",
        groups_by_degree={1: 8, 4: 1},
        a2a_ms=50.0,
    )


def test_metrics_file_tensorboard_and_interval(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", None, None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    cfg = LoggingConfig(
        log_interval=2,
        tensorboard_dir=str(tmp_path / "tb"),
        wandb_project=None,
        wandb_exp_name=None,
        metrics_file=str(tmp_path / "m" / "metrics.jsonl"),
        progress_bar=True,
    )
    lg = MetricsLogger(cfg, rank=0, train_iters=5)
    for it in range(1, 6):
        lg.log(_rec(it))
    lg.log_eval(4, 2.5)
    lg.close()
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    # every 2nd iteration plus the last one, then the validation line
    assert [x["iteration"] for x in lines] == [2, 4, 5, 4]
    x = lines[0]
    assert x["tokens_per_s"] == 8000.0 and x["a2a_share"] == 0.1 and x["groups_by_degree"] == {"1": 8, "4": 1}
    assert lines[-1] == {"iteration": 4, "valid_loss": 2.5}
    assert ("train/loss", 3.0, 2) in scalars and ("train/tokens_per_s", 8000.0, 4) in scalars
    assert ("valid/loss", 2.5, 4) in scalars and scalars[-1][0] == "closed"
    assert len(lg.records) == 5  # the summary sees every iteration


def test_only_rank0_writes(tmp_path):
    cfg = LoggingConfig(
        log_interval=1,
        tensorboard_dir=None,
        wandb_project=None,
        wandb_exp_name=None,
        metrics_file=str(tmp_path / "m.jsonl"),
        progress_bar=False,
    )
    lg = MetricsLogger(cfg, rank=1, train_iters=2)
    lg.log(_rec(1))
    assert not (tmp_path / "m.jsonl").exists() and lg.records == []


def test_console_line():
    line = format_line(_rec(3), 10)
    for part in (
        "iteration      3/10",
        "loss 2.00000",
        "tokens/s 8,000",
        "ms/iter 500.0",
        "est ms 400.0",
        "micro-batches 3",
        "groups d1x8 d4x1",
        "a2a 10.0%",
    ):
        assert part in line, part
