"""End to end: megatron.core GPTModel trained under heterogeneous FlexSP plans on 4 gloo ranks
equals a single-process run of megatron's stock model on the same global batches.

The reference is independent of the FlexSP path: megatron's stock local layer spec
(DotProductAttention), stock RoPE (positions 0..L-1 of each document), one document per forward
(no packing, no all-to-all, no per-token RoPE patch, no group pool), token-mean loss computed
directly over the global batch, plain torch SGD on plain tensors.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import FULL_RECOMPUTE, tiny_gpt_config

WORLD = 4
LR = 0.5
POOL = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]


def _plans():
    """Three global batches (lengths L_i) and their hand-written heterogeneous plans."""
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    p1 = Plan(
        WORLD,
        [5, 9, 7, 4, 23],
        [
            MicroBatch([Group([0, 1], [0, 1]), Group([2], [2]), Group([3], [3])]),  # degrees 2, 1, 1
            MicroBatch([Group([0, 1, 2, 3], [4])]),  # one long sequence on degree 4 (23 tokens -> 1 pad)
        ],
    )
    p2 = Plan(
        WORLD,
        [3, 17, 6, 2, 11, 8],
        [
            MicroBatch([Group([0, 1, 2, 3], [1, 0])]),  # documents of very different lengths in one group
            MicroBatch([Group([0], [2, 3]), Group([1], [5]), Group([2, 3], [4])]),
        ],
    )
    p3 = Plan(
        WORLD,
        [6, 10],
        [  # small batch: group [3] gets no sequence
            MicroBatch([Group([0, 1], [1]), Group([2], [0]), Group([3], [])]),
        ],
    )
    return [p1, p2, p3]


def _batches(vocab: int):
    g = torch.Generator().manual_seed(42)
    return [[torch.randint(0, vocab, (L + 1,), generator=g) for L in p.lengths] for p in _plans()]


def _cfg(pos: str, recompute: bool = False):
    # GQA (4 heads, 2 groups: degree 4 replicates kv heads), SwiGLU, RMSNorm, 2 layers.
    return tiny_gpt_config(pos, vocab_size=61, seed=11, extra=FULL_RECOMPUTE if recompute else {})


def _reference(pos: str):
    """Single process, stock megatron model, one document per forward."""
    from megatron.flexsp.runtime.model import build_gpt_model

    model = build_gpt_model(_cfg(pos), flexsp_attention=False)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for docs in _batches(61):
        total = sum(d.numel() - 1 for d in docs)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for d in docs:
            L = d.numel() - 1
            tok = model(d[None, :-1], torch.arange(L)[None], None, labels=d[None, 1:])
            loss = tok.sum() / total
            loss.backward()
            step_loss += float(loss.detach())
        opt.step()
        losses.append(step_loss)
    with torch.no_grad():  # evaluation loss of the trained model on the first batch
        docs = _batches(61)[0]
        total = sum(d.numel() - 1 for d in docs)
        eval_loss = (
            sum(
                float(model(d[None, :-1], torch.arange(d.numel() - 1)[None], None, labels=d[None, 1:]).sum())
                for d in docs
            )
            / total
        )
    return losses, init, {n: p.detach().clone() for n, p in model.named_parameters()}, eval_loss


def _planned(method):
    """The same batches planned by a planner method under a cost model of 8 tokens per rank on 4 ranks
    (so the 17- and 23-token documents need degree 4), instead of the hand-written plans."""
    from megatron.flexsp.planner.api import PlannerConfig, plan_global_batch
    from megatron.flexsp.planner.costmodel import build_cost_model

    cost = build_cost_model(
        name="exactness",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        gpus_per_node=4,
        alpha1_ms_per_token2=1e-3,
        alpha2_ms_per_token=0.1,
        beta1_ms=1.0,
        bandwidth_gbs={2: 1.0, 4: 0.5},
        limit_gb=1.0,
        model_states_mb=1016.0,
        activation_mb_per_token=1.0,
    )
    cfg = PlannerConfig(world_size=WORLD, method=method, work_limit=50)
    return [plan_global_batch(p.lengths, cost, cfg) for p in _plans()]


def _train_body(rank, world_size, mode, positions, recompute=False, method=None):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import full_state_dict, shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    pool = GroupPool(POOL)
    out = {}
    for pos in positions:
        model = build_gpt_model(_cfg(pos, recompute))
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        shard_model(model, mode)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        ex = FlexSPExecutor(model, pool, sharding_mode=mode)
        losses, stats = [], []
        for plan, docs in zip(_plans() if method is None else _planned(method), _batches(61)):
            opt.zero_grad(set_to_none=True)
            res = ex.run(plan, docs)
            opt.step()
            losses.append(res.loss)
            stats.append(res.stats)
        final = full_state_dict(model)
        opt.zero_grad(set_to_none=True)
        ev = ex.run(_plans()[0], _batches(61)[0], forward_only=True)
        no_grads = all(p.grad is None for p in model.parameters())
        out[pos] = dict(losses=losses, stats=stats, eval_loss=ev.loss, no_grads=no_grads, training=model.training)
        if rank == 0:
            ref_losses, ref_init, ref_final, ref_eval = _reference(pos)
            out[pos].update(
                final=final, init=init, ref_losses=ref_losses, ref_init=ref_init, ref_final=ref_final, ref_eval=ref_eval
            )
    return out


# The default suite covers both sharding modes, both position embeddings, and activation
# recomputation (with RoPE: the frequencies go through megatron's checkpoint function); the
# other combinations run with -m slow.
@pytest.mark.parametrize(
    "mode,pos,recompute",
    [
        ("fsdp2", "rope", True),
        ("ddp", "learned_absolute", False),
        pytest.param("fsdp2", "learned_absolute", False, marks=pytest.mark.slow),
        pytest.param("ddp", "rope", True, marks=pytest.mark.slow),
        pytest.param("fsdp2", "rope", False, marks=pytest.mark.slow),
    ],
)
def test_flexsp_training_matches_single_process(mode, pos, recompute):
    results = run_distributed(_train_body, WORLD, mode, (pos,), recompute, timeout=300)
    _check_against_reference(results, pos)


def _check_against_reference(results, pos):
    plans = _plans()
    r0 = results[0][pos]
    # Same initial weights as the single-process stock model (same names, same values).
    assert r0["init"].keys() == r0["ref_init"].keys()
    for n in r0["init"]:
        assert torch.equal(r0["init"][n], r0["ref_init"][n]), n
    # Same loss on every rank, equal to the reference's, step by step.
    for r in results:
        assert r[pos]["losses"] == r0["losses"]
    assert torch.allclose(
        torch.tensor(r0["losses"], dtype=torch.float64),
        torch.tensor(r0["ref_losses"], dtype=torch.float64),
        rtol=2e-7,
        atol=0,
    ), (pos, r0["losses"], r0["ref_losses"])
    # Parameters after 3 SGD steps.
    worst = 0.0
    for n, ref in r0["ref_final"].items():
        got = r0["final"][n]
        assert got.shape == ref.shape, n
        worst = max(worst, float((got - ref).abs().max()))
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (pos, n, float((got - ref).abs().max()))
    # Training moved the weights far more than the tolerance (the comparison has teeth).
    moved = max(float((r0["ref_final"][n] - r0["ref_init"][n]).abs().max()) for n in r0["ref_final"])
    assert moved > 1e3 * max(worst, 1e-9)
    # Stats: every loss token counted exactly once over ranks; empty group ran with 0 tokens.
    for step, plan in enumerate(plans):
        assert sum(r[pos]["stats"][step]["tokens"] for r in results) == sum(plan.lengths)
    assert results[3][pos]["stats"][2]["tokens"] == 0
    assert results[3][pos]["stats"][2]["slice_tokens"] > 0
    # Groups of degree > 1 exchange tokens; a step where a rank only sits in degree-1 groups does not.
    assert results[0][pos]["stats"][0]["a2a_bytes"] > 0
    assert results[2][pos]["stats"][2]["a2a_bytes"] == 0
    # Forward-only evaluation: same loss as the reference's no-grad pass, no gradients, mode restored.
    for r in results:
        assert r[pos]["eval_loss"] == results[0][pos]["eval_loss"]
        assert r[pos]["no_grads"] and r[pos]["training"]
    assert abs(r0["eval_loss"] - r0["ref_eval"]) <= 2e-7 * abs(r0["ref_eval"]), (r0["eval_loss"], r0["ref_eval"])


def _errors_body(rank, world_size):
    import time

    from flexsp_patches import cpu_compat
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    pool = GroupPool(POOL + [(0, 1, 2)])
    model = shard_model(build_gpt_model(_cfg("learned_absolute")), "ddp")
    ex = FlexSPExecutor(model, pool, sharding_mode="ddp")
    docs = [torch.arange(L + 1) for L in (4, 6)]
    long_docs = [docs[0], torch.arange(41) % 61]
    bad_docs = [docs[0], torch.tensor([1, 2, 3, 61, 4, 5, 6])]
    bad = {
        "not_partition": Plan(WORLD, [4, 6], [MicroBatch([Group([0, 1], [0, 1]), Group([2], [])])]),
        "not_in_pool": Plan(WORLD, [4, 6], [MicroBatch([Group([1, 2], [0, 1]), Group([0], []), Group([3], [])])]),
        "heads": Plan(WORLD, [4, 6], [MicroBatch([Group([0, 1, 2], [0]), Group([3], [1])])]),
        "length": Plan(WORLD, [4, 7], [MicroBatch([Group([0, 1, 2, 3], [0, 1])])]),
        "too_long": Plan(WORLD, [4, 40], [MicroBatch([Group([0, 1, 2, 3], [0, 1])])]),
        "vocab": Plan(WORLD, [4, 6], [MicroBatch([Group([0, 1, 2, 3], [0, 1])])]),
        # Rank 3 is handed a different (itself valid) plan: every rank must notice.
        "mismatch": Plan(WORLD, [4, 6], [MicroBatch([Group([0, 1, 2, 3], [0, 1] if rank != 3 else [1, 0])])]),
    }
    out = {}
    for name, plan in bad.items():
        t0 = time.monotonic()
        try:
            ex.run(plan, long_docs if name == "too_long" else bad_docs if name == "vocab" else docs)
            out[name] = ("no error", 0.0)
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out[name] = (f"{type(e).__name__}: {e}", time.monotonic() - t0)
    # The executor still works after rejected plans (no half-run micro-batch left behind).
    good = Plan(WORLD, [4, 6], [MicroBatch([Group([0, 1], [1]), Group([2], [0]), Group([3], [])])])
    out["good_loss"] = ex.run(good, docs).loss
    return out


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_bad_plans_fail_fast_on_every_rank():
    results = run_distributed(_errors_body, WORLD, timeout=180)
    expect = {
        "not_partition": "ranks \\[3\\]|partition",
        "not_in_pool": "not in the group pool",
        "heads": "does not divide num_attention_heads",
        "length": "sequence 1 has 7 ids",
        "too_long": "more than the model's learned absolute position embeddings",
        "vocab": "sequence 1 has token ids outside the vocabulary 0..60",
        "mismatch": "different plans",
    }
    import re

    for name, pattern in expect.items():
        for rank, r in enumerate(results):
            msg, secs = r[name]
            assert msg.startswith(("PlanError", "PlanMismatchError")), (name, rank, msg)
            assert re.search(pattern, msg), (name, rank, msg)
            assert secs < 10, (name, rank, secs)
    assert len({r["good_loss"] for r in results}) == 1


def _bf16_body(rank, world_size):
    import dataclasses

    from flexsp_patches import cpu_compat
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    pool = GroupPool([(0,), (1,), (0, 1)])
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 61, (L + 1,), generator=g) for L in (9, 5, 14)]
    plan = Plan(2, [9, 5, 14], [MicroBatch([Group([0], [0]), Group([1], [1])]), MicroBatch([Group([0, 1], [2])])])
    out = {}
    for bf16 in (False, True):
        model = shard_model(build_gpt_model(dataclasses.replace(_cfg("rope"), bf16=bf16)), "fsdp2")
        res = FlexSPExecutor(model, pool, sharding_mode="fsdp2").run(plan, docs)
        grads = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
        out[bf16] = dict(
            loss=res.loss,
            grads=grads,
            param_dtypes={str(p.dtype) for p in model.parameters()},
            grad_dtypes={str(p.grad.dtype) for p in model.parameters()},
        )
    try:
        FlexSPExecutor(
            shard_model(build_gpt_model(dataclasses.replace(_cfg("rope"), bf16=True)), "ddp"), pool, sharding_mode="ddp"
        )
        out["ddp"] = "no error"
    except ValueError as e:
        out["ddp"] = str(e)
    return out


def test_bf16_fsdp2_computes_in_bf16_keeps_fp32_states():
    r = run_distributed(_bf16_body, 2, timeout=180)[0]
    fp32, bf16 = r[False], r[True]
    assert bf16["param_dtypes"] == {"torch.float32"} and bf16["grad_dtypes"] == {"torch.float32"}
    assert bf16["loss"] != fp32["loss"]  # the compute really ran in bf16 ...
    assert abs(bf16["loss"] - fp32["loss"]) < 1e-2 * abs(fp32["loss"])  # ... and stays close
    cos = torch.nn.functional.cosine_similarity(bf16["grads"], fp32["grads"], dim=0)
    assert cos > 0.99, float(cos)
    assert "needs CUDA" in r["ddp"]


@pytest.mark.parametrize("method", ["megatron-dynamic-cp", pytest.param("megatron-hybrid-cp", marks=pytest.mark.slow)])
def test_planner_baselines_train_exactly_as_one_process(method):
    """The peers' plans (power-of-two groups, their own micro-batch counts) give the single-process losses."""
    plans = _planned(method)
    assert {len(g.ranks) for p in plans for mb in p.micro_batches for g in mb.groups} >= {1, 4}
    results = run_distributed(_train_body, WORLD, "fsdp2", ("rope",), False, method, timeout=300)
    r0 = results[0]["rope"]
    assert all(r["rope"]["losses"] == r0["losses"] for r in results)
    assert r0["losses"] == pytest.approx(r0["ref_losses"], rel=2e-7, abs=0)
    for n, ref in r0["ref_final"].items():
        assert torch.allclose(r0["final"][n], ref, rtol=1e-5, atol=1e-6), n
