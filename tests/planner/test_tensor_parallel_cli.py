"""``flexsp-plan --tensor-model-parallel-size``: every method plans over the same units, the plans say so, and
impossible sizes are one line with exit code 2 before any planning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron.flexsp.planner.api import METHODS
from megatron.flexsp.planner.cli import main
from megatron.flexsp.planner.plan import Plan, validate_plan
from megatron.flexsp.planner.tensor_parallel import unit_gpu_ranks
from tests.planner._p1_util import tiny_cost


@pytest.fixture
def cost_file(tmp_path):
    """8 heads, 4 GPUs per node, bandwidths up to 16 GPUs: at TP 2, 2 units per node and groups up to 4 units."""
    path = tmp_path / "tiny.json"
    tiny_cost(gpus_per_node=4, heads=8).save(path)
    return path


def _lengths_file(tmp_path):
    lengths = np.random.default_rng(1).integers(20, 2500, size=40)
    path = tmp_path / "lengths.txt"
    path.write_text("\n".join(str(x) for x in lengths) + "\n")
    return path


def test_every_method_plans_over_units_and_the_plans_say_so(tmp_path, cost_file, capsys):
    out = tmp_path / "out"
    argv = [str(_lengths_file(tmp_path)), "--cost-model", str(cost_file), "--world-size", "16"]
    argv += ["--tensor-model-parallel-size", "2", "--global-batch-size", "16", "--iters", "2", "--quiet"]
    argv += ["--time-limit", "0.5", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "16 ranks as 8 units of 2 GPUs" in printed
    assert "every method planned over 8 units of 2 GPUs" in printed
    per_gpu = tiny_cost(gpus_per_node=4, heads=8)
    for m in METHODS:
        for path in sorted((out / "plans" / m).glob("*.json")):
            raw = json.loads(path.read_text())
            assert raw["tensor_parallel_size"] == 2 and raw["world_size"] == 16
            plan = Plan.from_dict(raw)
            validate_plan(plan, per_gpu, world_size=16)
            for mb in plan.micro_batches:  # expanded to GPUs: a node's 2 units are never split across groups
                for g in mb.groups:
                    gpus = unit_gpu_ranks(g.ranks, 2)
                    nodes = {r // 4 for r in gpus}
                    assert len(nodes) == 1 if len(gpus) <= 4 else len(gpus) == 4 * len(nodes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tensor_parallel_size"] == 2 and summary["sequence_parallel"] is False


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tensor-model-parallel-size", "3"], "does not divide the world size 16"),
        (["--tensor-model-parallel-size", "8"], "does not divide gpus_per_node 4"),
        (["--tensor-model-parallel-size", "0"], "positive integer"),
        (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    ],
)
def test_impossible_tensor_parallel_settings_exit_2_with_one_line(tmp_path, cost_file, capsys, extra, message):
    argv = ["--synthetic", "50", "--cost-model", str(cost_file), "--world-size", "16", "--quiet", *extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("flexsp-plan: error:")


def test_heads_not_divisible_by_tp_is_refused(tmp_path, capsys):
    path = tmp_path / "six.json"
    tiny_cost(gpus_per_node=4, heads=6).save(path)
    with pytest.raises(SystemExit) as e:
        main(
            ["--synthetic", "50", "--cost-model", str(path), "--world-size", "16", "--tensor-model-parallel-size", "4"]
        )
    assert e.value.code == 2
    assert "does not divide num_attention_heads 6" in capsys.readouterr().err
