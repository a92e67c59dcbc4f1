"""Tensor parallelism: the unit <-> rank mapping of the group pool and the clear errors of bad settings
(issue 20, contract C6), each checked against the rule written out here, not the code's own helpers."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import tiny_gpt_config


def test_config_needs_heads_and_kv_groups_divisible_by_t():
    cfg = tiny_gpt_config(vocab_size=64, seed=1, tensor_model_parallel_size=2)  # 4 heads, 2 kv groups
    cfg.validate()
    with pytest.raises(ValueError, match="num_query_groups 2"):
        tiny_gpt_config(vocab_size=64, seed=1, tensor_model_parallel_size=4).validate()  # kv groups split first
    with pytest.raises(ValueError, match="positive int"):
        tiny_gpt_config(vocab_size=64, seed=1, tensor_model_parallel_size=0).validate()
    with pytest.raises(ValueError, match="sequence_parallel needs"):
        tiny_gpt_config(vocab_size=64, seed=1, sequence_parallel=True).validate()


def _body(rank, world_size):
    import torch

    from flexsp_patches import cpu_compat
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    t = 2
    cpu_compat.init_model_parallel(seed=3, device_type="cpu", tensor_model_parallel_size=t)
    out = {}
    pool = GroupPool([(0,), (1,), (0, 1)], tensor_parallel_size=t)
    out["groups"], out["degrees"] = pool.groups, pool.degrees
    out["members"] = {g: pool.members(g) for g in pool.groups}
    out["partition_ok"] = pool.check_partition([(0,), (1,)]) is None
    for key, call in {
        "outside": lambda: GroupPool([(0,), (2,)], tensor_parallel_size=t),  # 2 units only on 4 ranks
        "bad_t": lambda: GroupPool([(0,)], tensor_parallel_size=3),
        "not_member": lambda: pool.members((1, 0)),
        "sp_on_gloo": lambda: build_gpt_model(
            tiny_gpt_config(vocab_size=64, seed=1, tensor_model_parallel_size=t, sequence_parallel=True)
        ),
        "tp_mismatch": lambda: build_gpt_model(tiny_gpt_config(vocab_size=64, seed=1)),
    }.items():
        try:
            call()
            out[key] = None
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            out[key] = f"{type(e).__name__}: {e}"
    model = shard_model(build_gpt_model(tiny_gpt_config(vocab_size=64, seed=1, tensor_model_parallel_size=t)), "ddp")
    try:
        FlexSPExecutor(model, GroupPool([(0, 1, 2, 3)]), sharding_mode="ddp")
        out["pool_t"] = None
    except ValueError as e:
        out["pool_t"] = str(e)
    ex = FlexSPExecutor(model, pool, sharding_mode="ddp")
    docs = [torch.arange(5), torch.arange(7)]
    plan_t1 = Plan(4, [4, 6], [MicroBatch([Group([0, 1], [0]), Group([2, 3], [1])])])
    out["plan_t1"] = ex._local_check(plan_t1, docs)
    out["plan_ok"] = ex._local_check(
        Plan(4, [4, 6], [MicroBatch([Group([0], [0]), Group([1], [1])])], tensor_parallel_size=t), docs
    )
    return out


def test_pool_pairs_same_tp_ranks_and_bad_settings_fail_clearly():
    results = run_distributed(_body, 4, timeout=240)
    for rank, r in enumerate(results):
        j = rank % 2  # rank r: unit r // 2, TP rank r % 2
        assert r["groups"] == [(0,), (1,), (0, 1)] and r["degrees"] == [1, 2]
        assert r["members"] == {(0,): (0 + j,), (1,): (2 + j,), (0, 1): (0 + j, 2 + j)}
        assert r["partition_ok"]
        assert "outside the world 0..1" in r["outside"]
        assert "tensor_parallel_size 3" in r["bad_t"]
        assert "not in ascending rank order" in r["not_member"]
        assert "--sequence-parallel needs a backend with reduce-scatter (NCCL)" in r["sp_on_gloo"]
        assert "parallel_state has TP size 2" in r["tp_mismatch"]
        assert "build the pool with tensor_parallel_size=2" in r["pool_t"]
        assert "plan is for tensor_parallel_size 1" in r["plan_t1"]
        assert r["plan_ok"] is None
