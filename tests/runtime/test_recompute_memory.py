"""Saved-activation bytes per token, measured by the hooks, against the closed-form model per mode.

The measurement (``SavedBytesMeter``: torch's saved-tensor hooks plus the inputs a checkpoint
keeps, deduplicated by storage) runs the real executor; the model
(``activation_bytes_per_token``) is written from the model shape alone. They must agree within
1% (the issue asks 10%) for every mode, at 3 lengths, on two shapes, single documents and packs; and so must the
savings of each mode relative to none (selective core_attn saves little at degree 1, so its
saving is checked on its own, not drowned in the total).
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed

MODES = {
    "none": dict(granularity="none"),
    "full-uniform-1": dict(granularity="full", method="uniform", num_layers=1),
    "full-uniform-2": dict(granularity="full", method="uniform", num_layers=2),
    "full-block-1": dict(granularity="full", method="block", num_layers=1),
    "selective-core_attn": dict(granularity="selective", modules=("core_attn",)),
    "selective-mlp": dict(granularity="selective", modules=("mlp",)),
    "selective-both": dict(granularity="selective", modules=("core_attn", "mlp")),
}
SHAPES = {
    "gqa-h64": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96),
    "mha-h48": dict(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=6, ffn_hidden_size=80),
}
LENGTHS = [48, 120, 300]
# The issue asks for 10%; the model is written to the byte, so 1% keeps every term (RoPE tables: ~5%) honest.
TOLERANCE = 0.01
# Savings are differences of slopes; the attention kernel's few constant bytes differ by length (core_attn at
# one document saves 32 B/token, measured 30.9).
SAVINGS_TOLERANCE = 0.05


def _measure_body(rank, world_size):
    import torch

    from flexsp_patches import cpu_compat
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import GPTConfig, build_gpt_model
    from megatron.flexsp.runtime.recompute import RecomputeConfig, SavedBytesMeter, activation_bytes_per_token
    from megatron.flexsp.runtime.sharding import shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    g = torch.Generator().manual_seed(1)
    out = []
    for shape_name, shape in SHAPES.items():
        cfg = GPTConfig(vocab_size=53, max_position_embeddings=512, seed=2, **shape)
        model = shard_model(build_gpt_model(cfg), "fsdp2")
        for mode_name, kw in MODES.items():
            rc = RecomputeConfig(**kw)
            ex = FlexSPExecutor(model, GroupPool([(0,)]), sharding_mode="fsdp2", recompute=rc)
            for total in LENGTHS:
                for docs in (1, 3):
                    lengths = [total // docs] * docs
                    plan = Plan(1, lengths, [MicroBatch([Group([0], list(range(docs)))])])
                    seqs = [torch.randint(0, 53, (n + 1,), generator=g) for n in lengths]
                    with SavedBytesMeter() as meter:
                        ex.run(plan, seqs)
                    model_bpt = activation_bytes_per_token(cfg, rc.spec_for(), packed=docs > 1)
                    out.append((shape_name, mode_name, total, docs, meter.bytes / sum(lengths), model_bpt))
    return out


@pytest.fixture(scope="module")
def measured():
    (rows,) = run_distributed(_measure_body, 1, timeout=300)
    return {(s, m, t, d): (got, want) for s, m, t, d, got, want in rows}


def test_measured_bytes_per_token_match_the_closed_form(measured):
    for key, (got, want) in measured.items():
        assert abs(got - want) <= TOLERANCE * want, (key, got, want)


def _slope(measured, shape, mode, docs) -> float:
    """Measured bytes per token between the shortest and longest length (the kernel's few constant bytes cancel)."""
    lo, hi = LENGTHS[0], LENGTHS[-1]
    return (measured[(shape, mode, hi, docs)][0] * hi - measured[(shape, mode, lo, docs)][0] * lo) / (hi - lo)


def test_savings_per_mode_match_the_closed_form(measured):
    for shape in SHAPES:
        for docs in (1, 3):
            none = _slope(measured, shape, "none", docs)
            want_none = measured[(shape, "none", LENGTHS[0], docs)][1]
            for mode in MODES:
                if mode == "none":
                    continue
                saved = none - _slope(measured, shape, mode, docs)
                model_saved = want_none - measured[(shape, mode, LENGTHS[0], docs)][1]
                assert model_saved > 0 and abs(saved - model_saved) <= SAVINGS_TOLERANCE * model_saved, (
                    shape,
                    mode,
                    docs,
                    saved,
                )


def test_modes_order_as_expected(measured):
    """Longer full-recompute chunks keep less; recomputing the MLP saves more than the core attention."""
    for shape in SHAPES:
        for total in LENGTHS:
            b = {m: measured[(shape, m, total, 3)][0] for m in MODES}
            assert b["full-uniform-2"] < b["full-uniform-1"] < b["full-block-1"] < b["none"]
            assert b["selective-both"] < b["selective-mlp"] < b["selective-core_attn"] < b["none"]


def _degree_body(rank, world_size):
    import torch

    from flexsp_patches import cpu_compat
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import GPTConfig, build_gpt_model
    from megatron.flexsp.runtime.recompute import RecomputeConfig, SavedBytesMeter, activation_bytes_per_token
    from megatron.flexsp.runtime.sharding import shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    cfg = GPTConfig(vocab_size=53, max_position_embeddings=2048, seed=2, **SHAPES["gqa-h64"])
    model = shard_model(build_gpt_model(cfg), "fsdp2")
    out = []
    for d in (2, 4):
        groups = [list(range(i, i + d)) for i in range(0, 4, d)]
        for mode in ("none", "selective-core_attn", "full-uniform-1"):
            rc = RecomputeConfig(**MODES[mode])
            ex = FlexSPExecutor(model, GroupPool([tuple(g) for g in groups]), sharding_mode="fsdp2", recompute=rc)
            for docs in (1, 3):
                per_group = [120 * d // docs] * docs
                lengths = per_group * len(groups)
                mb = MicroBatch([Group(g, list(range(k * docs, (k + 1) * docs))) for k, g in enumerate(groups)])
                seqs = [torch.randint(0, 53, (n + 1,)) for n in lengths]
                with SavedBytesMeter() as meter:
                    ex.run(Plan(4, lengths, [mb]), seqs)
                local_tokens = sum(per_group) / d
                model_bpt = activation_bytes_per_token(cfg, rc.spec_for(), packed=docs > 1)
                out.append((d, mode, docs, meter.bytes / local_tokens, model_bpt))
    return out


@pytest.mark.slow  # 4 gloo ranks
def test_bytes_per_local_token_at_degree_2_and_4_stay_near_the_degree_1_model():
    """The planner charges act * T / d per rank: the degree-1 model must hold for SP groups too."""
    for rank_rows in run_distributed(_degree_body, 4, timeout=300):
        for d, mode, docs, got, want in rank_rows:
            assert abs(got - want) <= 0.10 * want, (d, mode, docs, got, want)
