"""GPU check (skipped without CUDA): FlexSP GPTModel on one GPU (NCCL, world size 1) vs megatron's
stock model on the same GPU, for every available transformer_impl x attention backend.

Ranks are spawned (tests.dist_utils uses ``spawn`` for NCCL), so no rank inherits a CUDA state.
One rank can only hold degree-1 groups, so this checks the GPU code paths (CUDA RoPE, fused
layers of the TE spec, flash / TE / SDPA kernels over packed documents, FSDP2 on NCCL, bf16),
not the exchange; the multi-rank exchange is covered on gloo by test_executor.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _variants():
    """Backends that really import here (an ABI-broken flash-attn or a core-only TE does not)."""
    if not torch.cuda.is_available():
        return [("local", "sdpa")]
    from megatron.flexsp.runtime.attention import backend_importable

    out = [("local", "sdpa")]
    if backend_importable("flash"):
        out.append(("local", "flash"))
    if backend_importable("te"):
        out += [("transformer_engine", "te"), ("transformer_engine", "sdpa")]
    return out


def _gpu_body(rank, world_size, impl, backend, bf16):
    import dataclasses

    from flexsp_patches import cpu_compat
    from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import GPTConfig, build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    dev = torch.device("cuda", 0)
    cpu_compat.init_model_parallel(seed=3)
    cfg = GPTConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=256,
        vocab_size=211,
        max_position_embeddings=256,
        position_embedding_type="rope",
        seed=7,
        transformer_impl=impl,
        attention_backend=backend,
        bf16=bf16,
    )
    g = torch.Generator().manual_seed(1)
    lengths = [37, 120, 5, 64]
    docs = [torch.randint(0, 211, (L + 1,), generator=g) for L in lengths]
    plan = Plan(1, lengths, [MicroBatch([Group([0], [0, 1])]), MicroBatch([Group([0], [2, 3])])])

    ref = build_gpt_model(dataclasses.replace(cfg, attention_backend="sdpa"), device=dev, flexsp_attention=False)
    model = build_gpt_model(cfg, device=dev)
    ref.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    total = sum(lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        ref_loss = 0.0
        for d in docs:
            d = d.to(dev)
            L = d.numel() - 1
            loss = ref(d[None, :-1], torch.arange(L, device=dev)[None], None, labels=d[None, 1:]).float().sum() / total
            loss.backward()
            ref_loss += float(loss)
    ref_grads = {n: p.grad.float().clone() for n, p in ref.named_parameters() if p.grad is not None}

    shard_model(model, "fsdp2")
    res = FlexSPExecutor(model, GroupPool([(0,)]), sharding_mode="fsdp2").run(plan, docs)
    grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters() if p.grad is not None}
    worst = max(float((grads[n] - ref_grads[n]).norm() / (ref_grads[n].norm() + 1e-12)) for n in ref_grads)
    return dict(loss=res.loss, ref_loss=ref_loss, worst_rel_grad=worst, names_match=grads.keys() == ref_grads.keys())


@pytest.mark.parametrize("impl,backend", _variants())
@pytest.mark.parametrize("bf16", [False, True])
def test_gpu_flexsp_model_matches_stock_megatron(impl, backend, bf16):
    if backend in ("flash", "te") and not bf16:
        pytest.skip("flash-attn / TE attention kernels need fp16/bf16")
    r = run_distributed(_gpu_body, 1, impl, backend, bf16, backend="nccl", timeout=300)[0]
    tol = 2e-2 if bf16 else 1e-5
    assert r["names_match"]
    assert abs(r["loss"] - r["ref_loss"]) <= tol * abs(r["ref_loss"]), r
    assert r["worst_rel_grad"] <= (5e-2 if bf16 else 1e-4), r
