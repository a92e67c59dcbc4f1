"""Tensor parallelism inside FlexSP's SP groups (issue 20): megatron.core's TP layers on gloo ranks
that form units of t consecutive ranks, the Ulysses all-to-all among the same-TP-rank members of a
group's units, FSDP2 / plain data parallel over the units, one loss per token.

The reference is independent of every TP and FlexSP path: one process, megatron's stock model at
TP 1 (local layer spec, stock RoPE), one document per forward, the token-mean loss of the global
batch written out, plain torch SGD. It runs in its own process (parallel_state holds one TP size
per process). Each TP rank's weights and gradients are compared with the matching slice of the
reference's: megatron's ``partition_dim`` and ``partition_stride`` say which (SwiGLU's FC1 keeps
its gate and up halves interleaved per rank).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import tiny_gpt_config

LR = 0.5
VOCAB = 64  # megatron's vocab-parallel embedding needs the vocabulary divisible by t


def _long_tail_batches(steps: int, seed: int = 7, docs: int = 5) -> list[list[int]]:
    """Mock long-tail lengths: many short documents, now and then a long one (Pareto tail, capped)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        u = torch.rand(docs, generator=g)
        out.append([int(min(60, 3 + 2.0 / float(x) ** 1.2)) for x in u])
    return out


def _flexsp_plan(world: int, t: int, lengths: list[int]):
    """Two units, groups of degree 1 and 2 over units: the longest document on both units, the
    rest alternating between one-unit groups (greedy by length)."""
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    long, rest = order[0], order[1:]
    loads, split = [0, 0], [[], []]
    for i in rest:
        u = loads.index(min(loads))
        split[u].append(i)
        loads[u] += lengths[i]
    mbs = [MicroBatch([Group([0, 1], [long])]), MicroBatch([Group([0], split[0]), Group([1], split[1])])]
    return Plan(world, lengths, mbs, tensor_parallel_size=t)


def _one_group_plan(world: int, t: int, lengths: list[int]):
    """Every document in one group of all units (TP 4 x 1 unit: degree 1; TP 2 x 2 units: a static
    plan of degree 2, like --sp-mode static --context-parallel-size 2), in two micro-batches."""
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan

    units = list(range(world // t))
    half = len(lengths) // 2
    idx = list(range(len(lengths)))
    mbs = [MicroBatch([Group(units, idx[:half])]), MicroBatch([Group(units, idx[half:])])]
    return Plan(world, lengths, mbs, tensor_parallel_size=t)


def _docs(lengths_per_step: list[list[int]]) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(42)
    return [[torch.randint(0, VOCAB, (L + 1,), generator=g) for L in lengths] for lengths in lengths_per_step]


def _cfg(t: int, kind: str):
    """The tiny GQA model (4 heads, 2 kv groups), or for TP 4 one with 8 heads in 4 kv groups, a tied
    output layer (the trainer's default) and linear biases."""
    cfg = tiny_gpt_config(vocab_size=VOCAB, seed=11, tensor_model_parallel_size=t)
    if kind == "mha8":
        cfg = dataclasses.replace(
            cfg,
            num_attention_heads=8,
            num_query_groups=4,
            share_embeddings_and_output_weights=True,
            add_bias_linear=True,  # column-parallel biases are split, row-parallel ones replicated over the unit
        )
    return cfg


def _reference_body(rank, world_size, kind, steps):
    """One process, TP 1, stock megatron model, one document per forward; first-step gradients kept."""
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.model import build_gpt_model

    cpu_compat.init_model_parallel(seed=3, device_type="cpu")
    model = build_gpt_model(_cfg(1, kind), flexsp_attention=False)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], None
    for docs in _docs(_long_tail_batches(steps)):
        total = sum(d.numel() - 1 for d in docs)
        opt.zero_grad(set_to_none=True)
        step = 0.0
        for d in docs:
            L = d.numel() - 1
            loss = model(d[None, :-1], torch.arange(L)[None], None, labels=d[None, 1:]).sum() / total
            loss.backward()
            step += float(loss.detach())
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(step)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(losses=losses, init=init, grads=grads, final=final)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _tp_body(rank, world_size, t, kind, plan_kind, mode, steps):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import (
        full_state_dict,
        shard_model,
        split_tensor_parallel,
        tensor_parallel_grad_norm,
    )
    from megatron.flexsp.training.optimizer import clip_grad_norm

    cpu_compat.init_model_parallel(seed=3, device_type="cpu", tensor_model_parallel_size=t)
    units = world_size // t
    pool = GroupPool(list(dict.fromkeys([(u,) for u in range(units)] + [tuple(range(units))])), tensor_parallel_size=t)
    model = build_gpt_model(_cfg(t, kind))
    layout = {
        n: (getattr(p, "partition_dim", -1), getattr(p, "partition_stride", 1))
        for n, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    shard_model(model, mode)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ex = FlexSPExecutor(model, pool, sharding_mode=mode)
    make = _flexsp_plan if plan_kind == "flexsp" else _one_group_plan
    losses, grads, degrees, gnorm = [], None, set(), None
    for lengths, docs in zip(_long_tail_batches(steps), _docs(_long_tail_batches(steps))):
        plan = make(world_size, t, lengths)
        opt.zero_grad(set_to_none=True)
        res = ex.run(plan, docs)
        degrees |= {r["degree"] for r in res.micro_batch_stats}
        if grads is None:
            grads = {n: _full(p.grad) for n, p in model.named_parameters()}
            gnorm = tensor_parallel_grad_norm(model, 0.0, clip_grad_norm)  # the trainer's norm; measure only
        opt.step()
        losses.append(res.loss)
    final = full_state_dict(model)  # TP partitions joined: the 1-process model's tensors
    resplit = split_tensor_parallel(final, model)
    local = {n: _full(p) for n, p in model.named_parameters()}
    resplit_ok = resplit.keys() == local.keys() and all(torch.equal(resplit[n], local[n]) for n in local)
    return dict(
        losses=losses,
        init=init,
        grads=grads,
        layout=layout,
        degrees=degrees,
        tp_rank=rank % t,
        final=final,
        resplit_ok=resplit_ok,
        gnorm=gnorm,
    )


def _slice(full: torch.Tensor, dim: int, stride: int, t: int, j: int) -> torch.Tensor:
    """TP rank j's part of a full tensor as megatron splits it: chunks j, j + t, ... of t * stride."""
    return torch.cat(torch.chunk(full, t * stride, dim=dim)[j::t], dim=dim)


def _check(results, ref, t, expected_degrees):
    r0 = results[0]
    assert r0["degrees"] == expected_degrees
    for r in results:  # one loss per step, the same on every rank
        assert r["losses"] == r0["losses"]
    got = torch.tensor(r0["losses"], dtype=torch.float64)
    want = torch.tensor(ref["losses"], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (r0["losses"], ref["losses"])
    assert float((want[1:] - want[0]).abs().max()) > 1e-3  # training moved the loss: the check has teeth
    worst = 0.0
    for r in results:
        j = r["tp_rank"]
        assert r["init"].keys() == ref["init"].keys()
        for n, full in ref["init"].items():
            dim, stride = r["layout"].get(n, (None, 1))
            part = full if dim is None else _slice(full, dim, stride, t, j)
            assert torch.equal(r["init"][n], part), n  # TP shards are slices of the 1-process weights
            gpart = ref["grads"][n] if dim is None else _slice(ref["grads"][n], dim, stride, t, j)
            assert r["grads"][n].shape == gpart.shape, n
            worst = max(worst, float((r["grads"][n] - gpart).abs().max()))
            assert torch.allclose(r["grads"][n], gpart, rtol=1e-4, atol=1e-7), (n, j)
    ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref["grads"].values())))
    for r in results:  # each parameter once: not this rank's partition alone, not the replicated norms t times
        assert r["gnorm"] == pytest.approx(ref_norm, rel=1e-5)
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    assert scale > 1e3 * max(worst, 1e-12)
    for r in results:  # the trained model, gathered over TP (what a checkpoint would hold), and split back
        assert r["final"].keys() == ref["final"].keys()
        for n, want in ref["final"].items():
            assert torch.allclose(r["final"][n], want, rtol=1e-5, atol=1e-6), n
        assert r["resplit_ok"]


def _run(world, t, kind, plan_kind, mode, steps, expected_degrees):
    ref = run_distributed(_reference_body, 1, kind, steps, timeout=240)[0]
    results = run_distributed(_tp_body, world, t, kind, plan_kind, mode, steps, timeout=400)
    _check(results, ref, t, expected_degrees)


def test_tp2_one_unit_two_ranks():
    """The smallest case in the default run: TP 2 on 2 ranks (one unit), 2 steps, FSDP2."""
    _run(2, 2, "gqa", "one", "fsdp2", 2, {1})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_tp2_two_units_flexsp_degrees_1_and_2(mode):
    """4 ranks, TP 2 x 2 units, groups of degree 1 and 2 over units (kv heads replicated at degree 2), 5 steps."""
    _run(4, 2, "gqa", "flexsp", mode, 5, {1, 2})


@pytest.mark.slow
def test_tp4_one_unit():
    """4 ranks, TP 4 x 1 unit (8 heads, 4 kv groups, tied output layer), 5 steps."""
    _run(4, 4, "mha8", "one", "fsdp2", 5, {1})


@pytest.mark.slow
def test_tp2_static_degree_2():
    """4 ranks, TP 2, a static plan: one group of both units (degree 2) in every micro-batch, 5 steps."""
    _run(4, 2, "mha8", "one", "fsdp2", 5, {2})
