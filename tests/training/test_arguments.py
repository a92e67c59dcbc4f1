"""Command line: Megatron flag names and defaults, and a clear error for every impossible setting."""

from __future__ import annotations

import pytest

from megatron.flexsp.data.tokenizer import BYTE_VOCAB_SIZE
from megatron.flexsp.planner.api import METHODS
from megatron.flexsp.training import arguments as A
from megatron.flexsp.training.configs import configs_from_args
from megatron.flexsp.training.cost_setup import resolve_cost_model
from megatron.flexsp.training.distributed import LaunchEnv, LaunchError, device_for_backend, launch_env
from megatron.flexsp.training.loop import main

GQA = ["--num-query-groups", "2", "--group-query-attention"]


def check(argv, ws=4, cuda=False):
    args = A.parse_args(argv)
    A.validate_args(args, ws, has_cuda=cuda)
    if cuda and args.flexsp_cost_model is None:
        args.flexsp_cost_model = "cpu-tiny"  # no GPU here to measure an analytic prior on
    start = resolve_cost_model(
        args, world_size=ws, local_ranks=min(ws, 2), cuda=cuda, vocab_size=A.resolve_vocab_size(args)
    )
    A.validate_against_cost(args, ws, start.cost)
    return args


def test_defaults_follow_megatron_meanings():
    a = check(["--seq-length", "1024", "--train-iters", "7"])
    assert a.max_position_embeddings == 1024  # defaults to --seq-length
    assert a.lr_decay_iters == 7
    assert a.num_query_groups == a.num_attention_heads
    assert a.sp_mode == "flexsp" and a.attention_backend == "auto" and a.flexsp_sharding == "fsdp2"
    assert A.parse_args(["--attention-backend", "fused"]).attention_backend == "te"
    assert A.parse_args(["--attention-backend", "unfused"]).attention_backend == "sdpa"
    args = A.parse_args(
        [
            "--lr",
            "3e-4",
            "--min-lr",
            "1e-5",
            "--lr-decay-style",
            "linear",
            "--sp-mode",
            "static",
            "--context-parallel-size",
            "4",
            "--metrics-file",
            "m.jsonl",
            "--hidden-size",
            "32",
            "--flexsp-time-limit",
            "0.5",
            "--no-progress-bar",
            "--mock-data",
        ]
    )
    c = configs_from_args(args, LaunchEnv(0, 4, 0, 4, "127.0.0.1", 1))
    assert (c.optimizer.lr, c.optimizer.min_lr, c.optimizer.lr_decay_style) == (3e-4, 1e-5, "linear")
    assert (c.flexsp.sp_mode, c.flexsp.context_parallel_size, c.flexsp.time_limit_s) == ("static", 4, 0.5)
    assert c.logging.metrics_file == "m.jsonl" and c.checkpoint.save_final and not c.logging.progress_bar
    # the model config is the runtime's GPTConfig, every shape flag carried over by name
    assert (c.model.hidden_size, c.model.num_layers) == (32, 2)
    # Megatron's table padding (--make-vocab-size-divisible-by 128); the data keeps the tokenizer's ids
    assert (c.model.vocab_size, c.data.vocab_size) == (384, BYTE_VOCAB_SIZE)
    assert c.model.share_embeddings_and_output_weights  # tied unless --untie-embeddings-and-output-weights
    assert c.model.attention_backend == "sdpa"  # 'auto' on the CPU
    assert c.data.mock and c.data.seq_length == 2048
    # the planner's settings per method: static takes --context-parallel-size, others choose their degrees
    assert c.flexsp.planner_config(4).static_degree == 4
    assert c.flexsp.planner_config(4, "flexsp").static_degree is None
    assert c.flexsp.planner_config(4).max_seq_len == 2048


def test_one_mode_list():
    assert A.SP_MODES is METHODS
    assert A.build_parser().parse_args(["--sp-mode", "megatron-hybrid-cp"]).sp_mode == "megatron-hybrid-cp"


def test_unknown_flag_stops_argparse(capsys):
    with pytest.raises(SystemExit):
        A.parse_args(["--num-layerz", "2"])
    assert "unrecognized arguments: --num-layerz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        A.parse_args(["--sp-mode", "ulysses"])
    assert "invalid choice: 'ulysses'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        A.parse_args(["--global-batch-size", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, ws, cuda, message",
    [
        (["--hidden-size", "66"], 4, False, "--hidden-size 66 is not divisible by --num-attention-heads 4"),
        (
            ["--num-query-groups", "3", "--group-query-attention"],
            4,
            False,
            "--num-attention-heads 4 is not divisible by --num-query-groups 3",
        ),
        (["--num-query-groups", "2"], 4, False, "add --group-query-attention"),
        (
            ["--seq-length", "2048", "--max-position-embeddings", "1024"],
            4,
            False,
            "--seq-length 2048 is above --max-position-embeddings 1024",
        ),
        ([], 3, False, "world size 3 is not a multiple of gpus_per_node 2"),
        (["--bf16"], 4, False, "--bf16 needs a GPU"),
        (["--distributed-backend", "nccl"], 4, False, "nccl needs CUDA"),
        (["--attention-backend", "flash"], 4, False, "--attention-backend flash needs a GPU"),
        (
            ["--attention-backend", "flash", "--flexsp-cost-model", "cpu-tiny"],
            4,
            True,
            "--attention-backend flash needs --bf16",
        ),
        (
            ["--attention-backend", "te", "--flexsp-cost-model", "cpu-tiny"],
            4,
            True,
            "--attention-backend te needs --bf16",
        ),
        (["--transformer-impl", "transformer_engine"], 4, False, "needs a GPU"),
        (
            ["--sp-mode", "static", "--context-parallel-size", "2", "--seq-length", "2048"],
            4,
            False,
            "--context-parallel-size 2 cannot hold --seq-length 2048: a group of 2 ranks holds 1024 tokens; use at least 4",
        ),
        (
            ["--sp-mode", "static", "--context-parallel-size", "3"],
            4,
            False,
            "--num-attention-heads 4 is not divisible by --context-parallel-size 3",
        ),
        (
            ["--seq-length", "4096"],
            4,
            False,
            "--seq-length 4096 does not fit any SP group: the largest (4 ranks) holds 2048",
        ),
        (["--context-parallel-size", "2"], 4, False, "--context-parallel-size 2 applies to --sp-mode static only"),
        (["--mock-data", "--data-path", "x"], 4, False, "--mock-data and --data-path are exclusive"),
        (["--data-path", "0.3", "a", "b"], 4, False, "weights and prefixes must come in pairs"),
        (["--data-path", "a", "0.5", "b"], 4, False, "mix of weighted and unweighted"),
        (["--save-interval", "5"], 4, False, "--save-interval needs --save"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], 4, False, "--min-lr 0.001 is above --lr 0.0001"),
        (
            ["--lr-warmup-iters", "30", "--train-iters", "20"],
            4,
            False,
            "--lr-warmup-iters 30 is above --lr-decay-iters 20",
        ),
        (["--tensor-model-parallel-size", "3"], 4, False, "does not divide the world size 4"),
        (["--hidden-dropout", "1.0"], 4, False, "--hidden-dropout must be below 1"),
        (["--split", "0,1,0"], 4, False, "the training share must be positive"),
        (["--tokenizer-type", "GPT2BPETokenizer"], 4, False, "is not supported"),
        (["--flexsp-cost-model", "gpt-1t"], 4, False, "unknown cost-model preset 'gpt-1t'"),
        (["--flexsp-cost-model", "/nonexistent/cost.json"], 4, False, "cost model file not found"),
    ],
)
def test_bad_settings_give_clear_errors(argv, ws, cuda, message):
    with pytest.raises(A.ArgumentError) as e:
        check(GQA + argv if "--num-query-groups" not in argv else argv, ws, cuda)
    assert message in str(e.value)


def test_a_cost_model_that_does_not_fit_the_model_gives_way_to_the_analytic_prior():
    """A preset made for another shape no longer stops the run: it starts from the prior and calibrates."""
    fits = A.parse_args(GQA)
    start = resolve_cost_model(fits, world_size=4, local_ranks=2, cuda=False, vocab_size=257)
    assert start.source == "preset" and start.cost.name == "cpu-tiny" or "cpu-tiny" in start.note
    other = A.parse_args(["--num-attention-heads", "8", "--hidden-size", "64", "--num-layers", "3"])
    start = resolve_cost_model(other, world_size=4, local_ranks=2, cuda=False, vocab_size=257)
    assert start.source == "prior" and "does not fit" in start.note and "analytic prior" in start.note
    c = start.cost
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.gpus_per_node) == (3, 64, 8, 2)
    assert c.compute.alpha2_ms_per_token > 0 and c.compute.alpha1_ms_per_token2 > 0
    A.validate_against_cost(other, 4, c)  # the prior is a valid starting point for this model
    with pytest.raises(A.ArgumentError, match="unknown cost-model preset"):
        resolve_cost_model(
            A.parse_args(["--flexsp-cost-model", "nope"]), world_size=4, local_ranks=2, cuda=False, vocab_size=257
        )


def test_time_limit_auto_and_gap():
    assert A.parse_args([]).flexsp_time_limit is None  # auto is the default
    assert A.parse_args(["--flexsp-time-limit", "0.3"]).flexsp_time_limit == 0.3
    from megatron.flexsp.training.configs import FlexSPConfig

    assert FlexSPConfig.auto_time_limit(1500.0) == pytest.approx(1.5 * A.AUTO_TIME_LIMIT_FRACTION)
    assert FlexSPConfig.auto_time_limit(1e6) == A.AUTO_TIME_LIMIT_CAP_S
    assert FlexSPConfig.auto_time_limit(10.0) == A.AUTO_TIME_LIMIT_MIN_S
    with pytest.raises(A.ArgumentError, match="--flexsp-gap must be below 1"):
        check(GQA + ["--flexsp-gap", "1.5"])


def test_missing_optional_backends(monkeypatch):
    monkeypatch.setattr(A, "_installed", lambda name: False)
    monkeypatch.setattr(A, "backend_importable", lambda name: name == "sdpa")
    with pytest.raises(A.ArgumentError, match="flash_attn does not import here"):
        check(["--attention-backend", "flash", "--bf16", "--flexsp-cost-model", "cpu-tiny"], cuda=True)
    with pytest.raises(A.ArgumentError, match="transformer_engine.pytorch does not import here"):
        check(["--attention-backend", "te", "--bf16", "--flexsp-cost-model", "cpu-tiny"], cuda=True)
    with pytest.raises(A.ArgumentError, match="tensorboard package is not installed"):
        check(["--tensorboard-dir", "tb"])
    with pytest.raises(A.ArgumentError, match="wandb package is not installed"):
        check(["--wandb-project", "p"])


def test_valid_static_and_gpu_settings_pass():
    check(GQA + ["--sp-mode", "static", "--context-parallel-size", "4", "--seq-length", "2048"])
    check(GQA + ["--sp-mode", "static", "--seq-length", "1000"])
    check(GQA + ["--bf16", "--flexsp-cost-model", "cpu-tiny"], cuda=True)
    assert A.parse_data_path(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    assert A.parse_data_path(["a", "b"]) == [(1.0, "a"), (1.0, "b")]


def test_launch_env_torchrun_slurm_single():
    e = launch_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h0",
            "MASTER_PORT": "1234",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.master_port) == (
        3,
        4,
        1,
        2,
        "h0",
        1234,
    )
    e = launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NNODES": "2",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "29500",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (5, 8, 1, 4)
    e = launch_env({})
    assert (e.rank, e.world_size, e.master_addr) == (0, 1, "127.0.0.1") and e.master_port > 0
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        launch_env({"RANK": "x", "WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match="rank 4 is outside world size 4"):
        launch_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"})
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        launch_env({"RANK": "0", "WORLD_SIZE": "4"})
    e = launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "TORCHELASTIC_RESTART_COUNT": "3"})
    assert e.restart_count == 3  # the attempt keys the rendezvous store


def test_gloo_runs_on_the_cpu_even_where_cuda_exists(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert device_for_backend("gloo") == ("gloo", torch.device("cpu"))
    assert device_for_backend(None) == ("nccl", None)  # the default with CUDA is nccl on the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for_backend(None) == ("gloo", torch.device("cpu"))
    with pytest.raises(LaunchError, match="nccl needs CUDA"):
        device_for_backend("nccl")


def test_main_reports_bad_settings_before_any_work(capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert main(["--bf16"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_gpt_flexsp.py: error: --bf16 needs a GPU" in err
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_parser_defaults_are_the_configs_defaults(monkeypatch):
    """Each default is written once, in its config dataclass: the parser reads it from there."""
    from dataclasses import MISSING, fields

    from megatron.flexsp.data.build import DataConfig
    from megatron.flexsp.runtime.model import GPTConfig
    from megatron.flexsp.training import config_types as C
    from megatron.flexsp.training.configs import FLAG_NAMES

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    args = A.parse_args([])
    # fields whose flag means something else by the same name: a switch, or a value resolved later
    # (from the tokenizer, --seq-length, the heads, the device)
    other_meaning = {"calibrate", "progress_bar", "save_final", "exit_signal", "swiglu", "vocab_size"}
    other_meaning |= {"num_query_groups", "max_position_embeddings", "attention_backend"}
    checked = []
    for cls in (C.OptimizerConfig, C.TrainConfig, C.FlexSPConfig, C.LoggingConfig, C.CheckpointConfig,
                C.DistributedConfig, GPTConfig, DataConfig):  # fmt: skip
        for f in fields(cls):
            flag = FLAG_NAMES.get(cls, {}).get(f.name, f.name)
            if f.default is MISSING or f.name in other_meaning or not hasattr(args, flag):
                continue
            assert getattr(args, flag) == f.default, (cls.__name__, f.name)
            checked.append(f.name)
    assert {"plan_ahead", "gap", "lr", "eval_iters", "timeout_minutes", "split", "rotary_base"} <= set(checked)
    assert args.flexsp_calibrate == ("on" if C.FlexSPConfig.calibrate else "off")


def test_the_prior_counts_a_tied_output_layer_once():
    """Megatron ties the output layer to the embedding unless --untie-embeddings-and-output-weights: the prior's
    model states (parameters, gradients, Adam moments) hold the V x h table once when tied."""
    from megatron.flexsp.planner.prior import num_parameters
    from megatron.flexsp.training.cost_setup import _shape

    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    tied, untied = (
        _shape(A.parse_args(argv + extra), 384) for extra in ([], ["--untie-embeddings-and-output-weights"])
    )
    assert tied.tied_embeddings and not untied.tied_embeddings
    assert num_parameters(untied) - num_parameters(tied) == 384 * 64
