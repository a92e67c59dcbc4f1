"""Attention-dropout masks differ across the ranks of an SP group (issue 17, item 5).

After the all-to-all, rank r of a degree-P group holds heads [r*h/P, (r+1)*h/P) of the same
tokens. Seeded alike, every rank used to draw the same masks, so head j and head j + h/P got
one mask. With every head's inputs identical, the output heads differ only by their masks:
equal heads mean equal masks. Dropout 0 must still match the single-process kernel.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed

HQ, HKV, D, TOKENS = 4, 2, 8, 24


def _seed(seed: int, rank: int) -> None:
    from megatron.flexsp.training.seeding import seed_everything

    seed_everything(seed, "cpu", rank)


def _body(rank: int, ws: int) -> dict:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention, varlen_causal_attention
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.packing import pack_group
    from megatron.flexsp.runtime.sp_group import packed_seq_params, sp_group

    _seed(1234, rank)
    pool = GroupPool([(0, 1)])
    packed = pack_group([torch.zeros(TOKENS + 1, dtype=torch.long)], rank, ws)
    s = packed.n_local
    gen = torch.Generator().manual_seed(5)  # same tokens on both ranks
    base = torch.randn(TOKENS, 1, D, generator=gen)
    q, k, v = base.expand(TOKENS, HQ, D).contiguous(), base.expand(TOKENS, HKV, D).contiguous(), base.clone()
    v = v.expand(TOKENS, HKV, D).contiguous()
    local = [x[rank * s : (rank + 1) * s].unsqueeze(1) for x in (q, k, v)]
    out = {}
    for p in (0.5, 0.0):
        cfg = TransformerConfig(
            num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV, kv_channels=D
        )
        attn = FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", attention_dropout=p).train()
        with sp_group(pool, (0, 1)) as active:
            y = attn(
                *local, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=packed_seq_params(packed, active)
            )
        out[p] = y.reshape(s, HQ, D)
    half = HQ // ws
    ref = varlen_causal_attention(q, k, v, packed.cu_seqlens, TOKENS)[rank * s : (rank + 1) * s]
    return dict(
        same_mask=bool(torch.equal(out[0.5][:, :half], out[0.5][:, half:])),
        no_dropout_err=(out[0.0] - ref).abs().max().item(),
    )


def test_dropout_masks_differ_across_sp_ranks_and_p0_matches_reference():
    res = run_distributed(_body, 2, timeout=120)
    for r in res:
        assert not r["same_mask"], "rank 0's heads and rank 1's heads drew the same dropout masks"
        assert r["no_dropout_err"] < 1e-6, res


def test_resumed_tracker_keeps_the_dropout_state():
    """The per-rank state lives in megatron's tracker, so checkpoints carry it (rng_state.tracker_states)."""
    import torch.distributed as dist

    from megatron.flexsp.runtime.sp_dropout import SP_DROPOUT_RNG, sp_dropout_rng
    from megatron.flexsp.training.rng_state import set_tracker_states, tracker_states

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    _seed(9, 3)
    saved = tracker_states()
    assert SP_DROPOUT_RNG in saved
    with sp_dropout_rng():
        first = torch.rand(8)
    set_tracker_states(saved)
    with sp_dropout_rng():
        again = torch.rand(8)
    assert torch.equal(first, again)


def test_a_checkpoint_without_the_dropout_state_keeps_it_seeded():
    """Resuming from a checkpoint written before this state existed: the state stays, as seeded."""
    import torch.distributed as dist

    from megatron.flexsp.runtime.sp_dropout import SP_DROPOUT_RNG
    from megatron.flexsp.training.rng_state import set_tracker_states, tracker_states

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    _seed(9, 3)
    old = {k: v for k, v in tracker_states().items() if k != SP_DROPOUT_RNG}
    set_tracker_states(old)
    assert SP_DROPOUT_RNG in tracker_states()
