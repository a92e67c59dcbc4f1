"""--recompute-* flags: Megatron's combinations, bad ones stop with one line and exit code 2 before any work.

Reference: the rules of megatron.core's TransformerConfig (method and layer count only with full,
1 <= layers <= num_layers, its module names), plus what FlexSP's runtime supports (core_attn, mlp).
"""

from __future__ import annotations

import pytest

from megatron.flexsp.training import arguments as A
from megatron.flexsp.training.configs import configs_from_args
from megatron.flexsp.training.distributed import LaunchEnv
from megatron.flexsp.training.loop import main

BASE = ["--num-layers", "2", "--mock-data", "--seq-length", "256", "--distributed-backend", "gloo"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--recompute-granularity", "full", "--recompute-num-layers", "3"], "must be between 1 and --num-layers 2"),
        (["--recompute-granularity", "full", "--recompute-num-layers", "0"], "must be between 1 and --num-layers 2"),
        (["--recompute-granularity", "selective", "--recompute-modules", "moe_act"], "moe_act: needs MoE/MLA/TE"),
        (["--recompute-granularity", "selective", "--recompute-modules", "attn"], "attn: is not a megatron"),
        (["--recompute-method", "block"], "needs --recompute-granularity full"),
        (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], "needs --recompute-granularity full"),
        (["--recompute-granularity", "full", "--recompute-modules", "mlp"], "needs --recompute-granularity selective"),
        (["--recompute-granularity", "auto", "--recompute-num-layers", "2"], "re-gathers its FSDP2 shards"),
    ],
)
def test_bad_recompute_flags_exit_2_with_one_line(flags, message, capsys):
    import torch.distributed as dist

    assert main(BASE + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1, err
    assert not dist.is_initialized()


def test_recompute_flags_reach_the_runtime_config():
    env = LaunchEnv(0, 4, 0, 4, "127.0.0.1", 1)
    c = configs_from_args(A.parse_args(BASE + ["--recompute-granularity", "full", "--recompute-method", "block"]), env)
    rc = c.flexsp.recompute_config()
    assert (rc.granularity, rc.method, rc.num_layers) == ("full", "block", None)
    spec = rc.spec_for("none")  # a fixed mode overrides the plan group's
    assert (spec.mode, spec.method, spec.num_layers) == ("full", "block", 1)
    c = configs_from_args(
        A.parse_args(BASE + ["--recompute-granularity", "selective", "--recompute-modules", "mlp"]), env
    )
    assert c.flexsp.recompute_config().spec_for().modules == frozenset({"mlp"})
    c = configs_from_args(A.parse_args(BASE + ["--recompute-granularity", "auto"]), env)
    assert [c.flexsp.recompute_config().spec_for(m).mode for m in ("none", "selective", "full")] == [
        "none",
        "selective",
        "full",
    ]
    c = configs_from_args(A.parse_args(BASE), env)  # default: none, whatever a plan group says
    assert c.flexsp.recompute_config().spec_for("full").mode == "none"
