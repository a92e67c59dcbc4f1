"""The megatron.core code that still asks parallel_state for the context-parallel group gets the
micro-batch's SP group (one test per reader), and a FlexSP micro-batch itself asks nothing.

Why: FlexSP's attention takes the group from ``PackedSeqParams`` only; the getter redirection of
``flexsp_patches.parallel_state`` is kept solely for megatron.core readers that are not handed a
group. Traced on megatron-core 0.16.1 (local spec, RoPE, recomputation): during a FlexSP
micro-batch no megatron.core code calls the getters (GPTModel passes ``packed_seq_params.cp_group``
down itself). The readers that would ask when called without a group are RoPE's dispatcher
``rope_utils.apply_rotary_pos_emb(cp_group=None)`` and the loss scaling of
``schedules.forward_step_calc_loss(cp_group_size=None)``; each is tested here under a degree-2
group and a degree-1 group.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import FULL_RECOMPUTE, tiny_gpt_config


def _gpt_config(pos: str = "rope"):
    return tiny_gpt_config(pos, vocab_size=61, seed=11, extra=FULL_RECOMPUTE)


def _rope_reader(pool, rank: int) -> dict:
    """RoPE's THD path asks parallel_state when no group is passed: it must rotate as the group's rank."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron.flexsp.runtime.model import to_transformer_config
    from megatron.flexsp.runtime.sp_group import sp_group

    config = to_transformer_config(_gpt_config())
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)  # two documents, split over a degree-2 group
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64)  # this rank's 12 of the 24 tokens
    freqs = torch.randn(16, 1, 1, 8, generator=gen, dtype=torch.float64)
    with sp_group(pool, (0, 1)) as active:
        asked = rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu)
        told = rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu, cp_group=active.group)
    with sp_group(pool, (rank,)) as alone:
        asked_alone = rope_utils.apply_rotary_pos_emb(t[:8], freqs, config, cu_seqlens=cu[:2])
        told_alone = rope_utils.apply_rotary_pos_emb(t[:8], freqs, config, cu_seqlens=cu[:2], cp_group=alone.group)
    return {
        "rope_same_as_told": torch.equal(asked, told),
        "rope_alone_same_as_told": torch.equal(asked_alone, told_alone),
        "rope_out": asked,
    }


def _loss_reader(pool, rank: int) -> dict:
    """megatron's legacy loss averaging multiplies by the context-parallel size it asks parallel_state for."""
    from megatron.core.pipeline_parallel import schedules

    from megatron.flexsp.runtime.model import to_transformer_config
    from megatron.flexsp.runtime.sp_group import sp_group

    config = to_transformer_config(_gpt_config())

    def scaled(ranks) -> float:
        with sp_group(pool, ranks):
            out, _ = schedules.forward_step_calc_loss(
                None, torch.tensor(3.0), lambda x: (x, {"lm loss": x}), config, None, False, 1, []
            )
        return float(out)

    return {"loss_degree2": scaled((0, 1)), "loss_degree1": scaled((rank,))}


def _trace_micro_batch(pool) -> list:
    """Callers of the getters while the executor runs a degree-2 micro-batch (RoPE, recomputation)."""
    import sys

    from megatron.core import parallel_state as ps

    from flexsp_patches import parallel_state as fps
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    model = shard_model(build_gpt_model(_gpt_config()), "fsdp2")
    ex = FlexSPExecutor(model, pool, sharding_mode="fsdp2")
    fps.install()
    calls: list = []
    saved = {name: getattr(ps, name) for name in fps._GETTERS}

    def spy(name, fn):
        def getter(*args, **kwargs):
            f = sys._getframe(1)
            calls.append((name, f.f_code.co_filename.rsplit("site-packages/", 1)[-1], f.f_code.co_name))
            return fn(*args, **kwargs)

        return getter

    try:
        for name, fn in saved.items():
            setattr(ps, name, spy(name, fn))
        plan = Plan(2, [5, 9], [MicroBatch([Group([0, 1], [0, 1])])])
        ex.run(plan, [torch.arange(6) % 61, torch.arange(10) % 61])
    finally:
        for name, fn in saved.items():
            setattr(ps, name, fn)
    return calls


def _readers_body(rank, world_size):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.group_pool import GroupPool

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    pool = GroupPool([(0,), (1,), (0, 1)])
    out = _rope_reader(pool, rank)
    out.update(_loss_reader(pool, rank))
    out["micro_batch_calls"] = _trace_micro_batch(pool)
    return out


def test_megatron_readers_get_the_micro_batch_group():
    r0, r1 = run_distributed(_readers_body, 2, timeout=240)
    for r in (r0, r1):
        # RoPE: asking parallel_state gives exactly what passing the micro-batch's group gives ...
        assert r["rope_same_as_told"] and r["rope_alone_same_as_told"]
        # loss: scaled by the micro-batch's degree, 2 then 1
        assert (r["loss_degree2"], r["loss_degree1"]) == (6.0, 3.0)
        # a FlexSP micro-batch asks nothing: the group travels with PackedSeqParams
        assert r["micro_batch_calls"] == []
    # ... and the group's ranks rotate different chunks of the same tokens (the group had effect)
    assert not torch.equal(r0["rope_out"], r1["rope_out"])
