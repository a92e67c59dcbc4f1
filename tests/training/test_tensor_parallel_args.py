"""The trainer's --tensor-model-parallel-size: impossible settings are one line, exit code 2, before any work;
valid ones plan over world/t units with the unit cost model (for every sp-mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

from megatron.flexsp.planner.plan import Plan, validate_plan
from megatron.flexsp.planner.presets import preset
from megatron.flexsp.planner.tensor_parallel import unit_cost_model
from megatron.flexsp.training import arguments as A
from megatron.flexsp.training.configs import configs_from_args
from megatron.flexsp.training.distributed import LaunchEnv
from megatron.flexsp.training.loop import main
from megatron.flexsp.training.planner_worker import plan_inline
from tests.planner._p1_util import tiny_cost

GQA = ["--num-query-groups", "2", "--group-query-attention", "--seq-length", "1024", "--mock-data"]


def _launch(monkeypatch, world: int, local: int) -> None:
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    env = {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(local)}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # never reached: the checks come first
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--tensor-model-parallel-size", "3"], 4, "--tensor-model-parallel-size 3 does not divide the world size 4"),
        (
            ["--num-attention-heads", "6", "--hidden-size", "96", "--num-query-groups", "6"],
            4,
            "--tensor-model-parallel-size 4 does not divide --num-attention-heads 6",
        ),
        (["--num-query-groups", "1"], 4, "--tensor-model-parallel-size 4 does not divide --num-query-groups 1"),
        (["--sequence-parallel", "--tensor-model-parallel-size", "2"], 4, "--sequence-parallel needs NCCL"),
        (["--sequence-parallel"], 4, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4, "pipeline parallelism"),
        (
            ["--tensor-model-parallel-size", "2", "--save", "/tmp/x", "--ckpt-format", "torch"],
            4,
            "--ckpt-format torch cannot save a run at --tensor-model-parallel-size 2",
        ),
    ],
)
def test_impossible_settings_exit_2_with_one_line(monkeypatch, capsys, argv, world, message):
    _launch(monkeypatch, world, world)
    if "--tensor-model-parallel-size" not in argv:
        argv = [*argv, "--tensor-model-parallel-size", "4"] if "--sequence-parallel" not in argv else argv
    assert main(["--group-query-attention", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain_gpt_flexsp.py: error: ") and message in err[0]
    assert not dist.is_initialized()


def test_the_padded_vocabulary_must_split_over_tp(monkeypatch, capsys):
    _launch(monkeypatch, 4, 4)
    # the byte vocabulary (257 ids) padded to a multiple of 2 is 258: TP 4 cannot split it
    argv = [*GQA, "--tensor-model-parallel-size", "4", "--make-vocab-size-divisible-by", "2", "--num-query-groups", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide the padded vocabulary 258" in err[0]


def _env(world: int, local: int) -> LaunchEnv:
    return LaunchEnv(rank=0, world_size=world, local_rank=0, local_world_size=local, master_addr="x", master_port=1)


def test_a_too_long_seq_length_names_the_units(monkeypatch, capsys):
    _launch(monkeypatch, 4, 2)
    # cpu-tiny at TP 2: 2 units hold (1024 - 512) MB / (1 MB * 22/34 replicated share) * 2 = 1582 tokens
    assert main([*GQA, "--tensor-model-parallel-size", "2", "--seq-length", "2048"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the largest (2 units of 2 ranks) holds 1582 tokens" in err[0]
    assert err[0].endswith("(or --sequence-parallel on NCCL)")


def test_node_size_limits_the_tp_group(tmp_path):
    args = A.parse_args([*GQA, "--tensor-model-parallel-size", "2"])
    with pytest.raises(A.ArgumentError, match="does not divide the 3 ranks per node"):
        configs_from_args(args, _env(6, 3))
    path = tmp_path / "cost.json"  # 8 heads, 2 GPUs per node: TP 4 does not fit a node of this cost model
    tiny_cost(gpus_per_node=2, heads=8).save(path)
    shape = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--mock-data"]
    args = A.parse_args([*shape, "--seq-length", "256", "--flexsp-cost-model", str(path)])
    args.tensor_model_parallel_size = 4
    with pytest.raises(A.ArgumentError, match="does not divide gpus_per_node 2"):
        configs_from_args(args, _env(8, 4))


@pytest.mark.parametrize("mode", ["flexsp", "static", "megatron-hybrid-cp", "megatron-dynamic-cp"])
def test_valid_tp_plans_over_units_with_the_unit_model(mode):
    extra = ["--context-parallel-size", "2"] if mode == "static" else []
    args = A.parse_args([*GQA, "--tensor-model-parallel-size", "2", "--sp-mode", mode, *extra])
    cfgs = configs_from_args(args, _env(4, 2))
    per_gpu = preset("cpu-tiny", 4)  # the preset the CPU run starts from for this shape
    assert cfgs.cost.to_dict() == unit_cost_model(per_gpu, 2).to_dict()
    assert "2 units of 2 ranks" in cfgs.cost_note
    cfg = cfgs.flexsp.planner_config(4)
    assert cfg.world_size == 2
    lengths = np.random.default_rng(0).integers(30, 1024, size=8).tolist()
    plan = Plan.from_dict(plan_inline(lengths, cfgs.cost, cfg).to_dict())  # as the background worker hands it over
    assert (plan.tensor_parallel_size, plan.world_size, plan.num_units) == (2, 4, 2)
    validate_plan(plan, per_gpu, world_size=4, num_sequences=len(lengths))
    if mode == "static":
        assert {g.degree for mb in plan.micro_batches for g in mb.groups} == {2}


def test_online_calibration_reads_every_gpu_of_a_units_group():
    from megatron.flexsp.planner.plan import Group, MicroBatch
    from megatron.flexsp.training.online_calibration import SLOTS_PER_RANK, OnlineCalibration

    # 8 GPUs at TP 2: unit 0 alone, units 1..3 together (GPUs 2..7)
    plan = Plan(8, [100, 300], [MicroBatch([Group([0], [0]), Group([1, 2, 3], [1])])], tensor_parallel_size=2)
    gathered = [0.0] * (SLOTS_PER_RANK * 8)
    for gpu, (compute, a2a) in enumerate([(5, 0), (6, 0), (7, 1), (9, 2), (8, 3), (7, 1), (7, 1), (8, 1)]):
        gathered[SLOTS_PER_RANK * gpu : SLOTS_PER_RANK * gpu + 2] = [compute, a2a]
    cal = OnlineCalibration(unit_cost_model(tiny_cost(gpus_per_node=8, heads=8), 2), enabled=True, rank=0, world_size=8)
    one, three = cal.samples(plan, gathered)
    assert (one.degree, one.tokens, one.compute_ms) == (1, 100, 6)  # the slower GPU of unit 0 (GPUs 0, 1)
    # GPUs 2..7: compute of the slowest (9), all-to-all of the one that waited least (1: the transfer)
    assert (three.degree, three.tokens, three.compute_ms, three.a2a_ms) == (3, 300, 9, 1)


def test_background_planner_hands_over_plans_over_units():
    from megatron.flexsp.planner.api import PlannerConfig
    from megatron.flexsp.training.planner_hook import PlannerHook

    per_gpu = tiny_cost(gpus_per_node=4, heads=8)
    unit = unit_cost_model(per_gpu, 2)  # 8 GPUs = 4 units
    rng = np.random.default_rng(5)
    batches = [rng.integers(30, 1500, size=6).tolist() for _ in range(3)]
    cfg = PlannerConfig(world_size=4, method="flexsp", time_limit_s=0.3)
    with PlannerHook(unit, cfg, lambda k: batches[k % 3], plan_ahead=2, broadcast=False, startup_wait_s=60) as hook:
        for k in range(3):
            plan, info = hook.get_plan(k)
            assert (plan.tensor_parallel_size, plan.world_size) == (2, 8), info.source
            validate_plan(plan, per_gpu, world_size=8, num_sequences=6)
        hook.update(cost=unit_cost_model(per_gpu, 2))  # a recalibrated unit model keeps planning over units
        assert hook.get_plan(3)[0].tensor_parallel_size == 2


def test_a_saved_unit_cost_model_starts_a_run_at_its_own_tp_only(tmp_path):
    unit = unit_cost_model(preset("cpu-tiny", 4), 2)  # what --flexsp-save-calibrated writes for a TP 2 run
    path = tmp_path / "calibrated.json"
    unit.save(path)
    args = A.parse_args([*GQA, "--tensor-model-parallel-size", "2", "--flexsp-cost-model", str(path)])
    cfgs = configs_from_args(args, _env(4, 2))
    assert cfgs.cost.to_dict() == unit.to_dict()  # used as it is: not divided over TP a second time
    args = A.parse_args([*GQA, "--flexsp-cost-model", str(path)])
    with pytest.raises(A.ArgumentError, match="is over units of TP 2, the run has --tensor-model-parallel-size 1"):
        configs_from_args(args, _env(4, 2))
