"""Activation recomputation: same losses and gradients as without it, with the layers really re-run.

Reference: the same model, plan and random state run with recomputation off (the exactness of
that path against a single-process stock model is test_executor's). Each mode must also show that
it recomputed (the core attention or the MLP forwards again in backward) and kept less for
backward (saved bytes), so a wrapper that silently does nothing fails. Dropout is on: the
recomputed forward must draw the same masks (default generator and megatron's tracker states,
FlexSP's per-rank SP-dropout state among them).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import tiny_gpt_config

VOCAB = 61

# (name, RecomputeConfig kwargs)
FIXED_MODES = [
    ("full-uniform-1", dict(granularity="full", method="uniform", num_layers=1)),
    ("full-uniform-2", dict(granularity="full", method="uniform", num_layers=2)),
    ("full-block-1", dict(granularity="full", method="block", num_layers=1)),
    ("selective-core_attn", dict(granularity="selective", modules=("core_attn",))),
    ("selective-core_attn-mlp", dict(granularity="selective", modules=("core_attn", "mlp"))),
]


def _cfg(dropout: float, bf16: bool = False):
    """The tiny GQA model with 3 layers (so uniform chunks of 2 leave a shorter last chunk)."""
    base = tiny_gpt_config(
        "rope", vocab_size=VOCAB, max_position_embeddings=64, seed=11, hidden_dropout=dropout, attention_dropout=dropout
    )
    return dataclasses.replace(base, num_layers=3, bf16=bf16)


def _count_calls(model) -> dict[str, list[int]]:
    """Forward calls of every layer's core attention and MLP (a recomputed module forwards twice).

    Counted in the modules' own forward, on entry (installed before the recompute wrappers, so a
    checkpoint's re-run is counted; torch stops a recompute right after the last saved tensor).
    """
    calls = {"core_attn": [0], "mlp": [0]}

    def counting(fwd, c):
        def forward(*args, **kwargs):
            c[0] += 1
            return fwd(*args, **kwargs)

        return forward

    for layer in model.decoder.layers:
        for name, mod in (("core_attn", layer.self_attention.core_attention), ("mlp", layer.mlp)):
            mod.forward = counting(mod.forward, calls[name])
    return calls


def _run_mode(rank, plan, docs, mode_kw, dropout, sharding, group_modes=None, bf16=False):
    """Fresh model and RNG state; one step; (loss, full grads, calls, saved bytes, a2a bytes)."""
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.recompute import RecomputeConfig, SavedBytesMeter
    from megatron.flexsp.runtime.sharding import shard_model
    from megatron.flexsp.runtime.sp_dropout import add_sp_dropout_state

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    add_sp_dropout_state(3, rank)
    torch.manual_seed(100 + rank)
    model = shard_model(build_gpt_model(_cfg(dropout, bf16)), sharding)
    calls = _count_calls(model)
    pool = GroupPool(sorted({tuple(g.ranks) for mb in plan.micro_batches for g in mb.groups}))
    if group_modes is not None:
        for mb, modes in zip(plan.micro_batches, group_modes):
            for g, m in zip(mb.groups, modes):
                g.recompute = m
    ex = FlexSPExecutor(model, pool, sharding_mode=sharding, recompute=RecomputeConfig(**mode_kw))
    with SavedBytesMeter() as meter:
        res = ex.run(plan, docs)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g.detach().clone()
    counted = {k: v[0] for k, v in calls.items()}
    fwd_a2a = ex.run(plan, docs, forward_only=True).stats["a2a_bytes"]  # the forward's exchanges alone
    return dict(
        fwd_a2a=fwd_a2a,
        loss=res.loss,
        grads=grads,
        calls=counted,
        saved=meter.bytes,
        a2a=res.stats["a2a_bytes"],
        modes=[r["recompute"] for r in res.micro_batch_stats],
    )


def _single_body(rank, world_size, dropout):
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    g = torch.Generator().manual_seed(5)
    lengths = [37, 12, 20]
    docs = [torch.randint(0, VOCAB, (L + 1,), generator=g) for L in lengths]
    plan = Plan(1, lengths, [MicroBatch([Group([0], [0, 1])]), MicroBatch([Group([0], [2])])])
    # Recomputing modes first: the process's first attention call (one-time probes) is recomputed too.
    out = {name: _run_mode(rank, plan, docs, kw, dropout, "fsdp2") for name, kw in FIXED_MODES}
    out["none"] = _run_mode(rank, plan, docs, dict(granularity="none"), dropout, "fsdp2")
    return out


def _assert_equal_to_none(res: dict, name: str, rel: float = 1e-6) -> None:
    ref, got = res["none"], res[name]
    assert abs(got["loss"] - ref["loss"]) <= rel * abs(ref["loss"]), (name, got["loss"], ref["loss"])
    for n, r in ref["grads"].items():
        err = float((got["grads"][n] - r).abs().max())
        scale = float(r.abs().max())
        assert err <= rel * scale + 1e-12, (name, n, err, scale)


def _assert_recomputed(res: dict, name: str, layers: int = 3) -> None:
    """Each mode re-ran exactly what it should, and kept less for backward than none."""
    base, got = res["none"]["calls"], res[name]["calls"]
    kw = dict(FIXED_MODES)[name]
    if kw["granularity"] == "full":
        per_mb = layers if kw["method"] == "uniform" else kw["num_layers"]
        extra = {"core_attn": per_mb, "mlp": per_mb}
    else:
        extra = {m: (layers if m in kw["modules"] else 0) for m in ("core_attn", "mlp")}
    mbs = base["core_attn"] // layers
    for m in ("core_attn", "mlp"):
        assert got[m] == base[m] + extra[m] * mbs, (name, m, got, base)
    assert res[name]["saved"] < res["none"]["saved"], (name, res[name]["saved"], res["none"]["saved"])


@pytest.mark.parametrize("dropout", [pytest.param(0.0, marks=pytest.mark.slow), 0.1])
def test_recompute_equals_none_single_process(dropout):
    (res,) = run_distributed(_single_body, 1, dropout, timeout=240)
    if dropout:  # dropout really draws: another seed gives another loss (checked via the two runs' values)
        assert res["none"]["loss"] > 0
    for name, _ in FIXED_MODES:
        _assert_equal_to_none(res, name)
        _assert_recomputed(res, name)
    # Full recomputation with one layer per chunk keeps the least of the full variants.
    assert res["full-uniform-2"]["saved"] < res["full-block-1"]["saved"]


def _multi_plan():
    """Heterogeneous groups on 4 ranks: degrees 2+1+1, one group of 4, 1+1+2."""
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    lengths = [30, 9, 14, 44, 7, 11, 26]
    plan = Plan(
        4,
        lengths,
        [
            MicroBatch([Group([0, 1], [0]), Group([2], [1]), Group([3], [2])]),
            MicroBatch([Group([0, 1, 2, 3], [3])]),
            MicroBatch([Group([0], [4]), Group([1], [5]), Group([2, 3], [6])]),
        ],
    )
    g = torch.Generator().manual_seed(9)
    return plan, [torch.randint(0, VOCAB, (L + 1,), generator=g) for L in lengths]


# Under auto, each group's own mode (ranks of one micro-batch differ, FSDP2 collectives still line up).
AUTO_MODES = [["full", "selective", "none"], ["selective"], ["none", "full", "selective"]]


def _multi_body(rank, world_size, dropout):
    plan, docs = _multi_plan()
    out = {"none": _run_mode(rank, plan, docs, dict(granularity="none"), dropout, "fsdp2")}
    out["full-uniform-2"] = _run_mode(rank, *_multi_plan(), FIXED_MODES[1][1], dropout, "fsdp2")
    out["selective-core_attn"] = _run_mode(rank, *_multi_plan(), FIXED_MODES[3][1], dropout, "fsdp2")
    out["auto"] = _run_mode(rank, *_multi_plan(), dict(granularity="auto"), dropout, "fsdp2", AUTO_MODES)
    for v in out.values():
        del v["calls"]
    return out


@pytest.mark.parametrize("dropout", [0.1])
def test_recompute_equals_none_on_4_ranks_fsdp2(dropout):
    results = run_distributed(_multi_body, 4, dropout, timeout=300)
    for rank, res in enumerate(results):
        for name in ("full-uniform-2", "selective-core_attn", "auto"):
            _assert_equal_to_none(res, name)
        # The plan's modes were applied per group (auto), the fixed mode everywhere otherwise.
        assert res["auto"]["modes"] == [
            AUTO_MODES[0][{0: 0, 1: 0, 2: 1, 3: 2}[rank]],
            AUTO_MODES[1][0],
            AUTO_MODES[2][{0: 0, 1: 1, 2: 2, 3: 2}[rank]],
        ]
        assert res["full-uniform-2"]["modes"] == ["full"] * 3
        # Without recomputation: the forward's exchanges F and their adjoints (same volume) in backward.
        fwd = res["none"]["fwd_a2a"]
        assert fwd > 0 and res["none"]["a2a"] == 2 * fwd
        # Full recomputation re-runs every exchange of the forward: exactly F more.
        assert res["full-uniform-2"]["a2a"] - res["none"]["a2a"] == fwd
        # A recomputed core attention exchanges q, k, v again but not its output (torch stops a
        # recompute after the last tensor saved for backward): 0 < extra < F.
        extra = res["selective-core_attn"]["a2a"] - res["none"]["a2a"]
        assert 0 < extra < fwd, (extra, fwd)
    # Same loss on every rank.
    assert len({r["auto"]["loss"] for r in results}) == 1


def _bf16_body(rank, world_size):
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    g = torch.Generator().manual_seed(6)
    lengths = [40, 17]
    docs = [torch.randint(0, VOCAB, (L + 1,), generator=g) for L in lengths]
    plan = Plan(1, lengths, [MicroBatch([Group([0], [0, 1])])])
    out = {name: _run_mode(rank, plan, docs, kw, 0.1, "fsdp2", bf16=True) for name, kw in FIXED_MODES[::2]}
    out["none"] = _run_mode(rank, plan, docs, dict(granularity="none"), 0.1, "fsdp2", bf16=True)
    return out


def test_recompute_equals_none_in_bf16():
    """FSDP2's bf16 mixed precision: the recomputed forward casts and computes exactly as the first one."""
    (res,) = run_distributed(_bf16_body, 1, timeout=240)
    for name, _ in FIXED_MODES[::2]:
        _assert_equal_to_none(res, name)
        _assert_recomputed(res, name)
