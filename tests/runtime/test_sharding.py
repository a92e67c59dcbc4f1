"""Reduction semantics: the global token-mean loss (runtime.loss) and gradient SUM over ranks
with FSDP2 and plain data parallel (runtime.sharding), each against a single-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from tests.runtime.tiny_model import tiny_gpt_config


# ------------------------------------------------------------------------------------ loss
def test_scaled_losses_over_any_split_sum_to_the_global_token_mean():
    from megatron.flexsp.runtime.loss import global_batch_tokens, masked_loss_sum, scaled_loss

    torch.manual_seed(0)
    lengths = [3, 7, 1, 5]
    logits = [torch.randn(L, 11) for L in lengths]
    labels = [torch.randint(0, 11, (L,)) for L in lengths]
    ref = F.cross_entropy(torch.cat(logits), torch.cat(labels))  # mean over all tokens
    total = global_batch_tokens(lengths)
    # An arbitrary split into "ranks", each with padding (mask 0, garbage loss) appended.
    parts = [[0, 2], [1], [3]]
    acc = torch.zeros((), dtype=torch.float64)
    for part in parts:
        tok = torch.cat(
            [F.cross_entropy(logits[i], labels[i], reduction="none") for i in part] + [torch.full((2,), 99.0)]
        )
        mask = torch.cat([torch.ones(sum(lengths[i] for i in part)), torch.zeros(2)])
        acc += scaled_loss(tok[None], mask[None], total).double()
        assert masked_loss_sum(tok, mask) <= tok[:-2].sum() + 1e-5
    assert torch.allclose(acc, ref.double(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        global_batch_tokens([])
    with pytest.raises(ValueError, match="differ in shape"):
        masked_loss_sum(torch.ones(3), torch.ones(4))


# ----------------------------------------------------------------------- gradient reduction
def _cfg():
    return tiny_gpt_config("rope", vocab_size=40, seed=21)


def _docs():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 40, (L + 1,), generator=g) for L in (6, 3, 9, 4)]


def _doc_loss(model, d):
    L = d.numel() - 1
    return model(d[None, :-1], torch.arange(L)[None], None, labels=d[None, 1:]).sum()


def _grad_body(rank, world_size):
    from flexsp_patches import cpu_compat
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import finish_grad_sync, full_state_dict, shard_model

    cpu_compat.init_model_parallel(seed=1, device_type="cpu")
    docs = _docs()
    out = {}
    for mode in ("fsdp2", "ddp"):
        # Stock megatron model (no FlexSP attention): this test is about the reduction only.
        model = build_gpt_model(_cfg(), flexsp_attention=False)
        if rank == 0:  # a different rank-0 init must be overwritten by the broadcast
            with torch.no_grad():
                next(model.parameters()).add_(0.0)
        else:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)  # sync_params must repair this
        shard_model(model, mode)
        for micro in range(2):  # two backward passes accumulate before the sync
            _doc_loss(model, docs[rank] if micro == 0 else docs[(rank + 1) % world_size]).backward()
        finish_grad_sync(model, bucket_numel=3000)  # ddp: all-reduce SUM in several buckets; fsdp2: no-op
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
        out[mode] = {"grads": grads, "params": full_state_dict(model)}
        try:
            shard_model(model, mode)
            out[mode]["double"] = "no error"
        except RuntimeError as e:
            out[mode]["double"] = str(e)
    if rank == 0:
        ref = build_gpt_model(_cfg(), flexsp_attention=False)
        for micro in range(2):
            for r in range(world_size):
                _doc_loss(ref, docs[r] if micro == 0 else docs[(r + 1) % world_size]).backward()
        out["ref_grads"] = {n: p.grad.clone() for n, p in ref.named_parameters()}
        out["ref_params"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return out


def test_gradients_are_summed_over_ranks_fsdp2_and_ddp():
    results = run_distributed(_grad_body, 4, timeout=180)
    r0 = results[0]
    for mode in ("fsdp2", "ddp"):
        for r in results:
            assert "already sharded" in r[mode]["double"]
            for n, ref in r0["ref_params"].items():
                assert torch.equal(r[mode]["params"][n], ref), (mode, n)  # broadcast repaired rank 1..3
            for n, ref in r0["ref_grads"].items():
                got = r[mode]["grads"][n]
                # SUM over 4 ranks (an average would be 4x smaller).
                assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (mode, n, float((got - ref).abs().max()))


def test_shard_model_rejects_bad_mode():
    from megatron.flexsp.runtime.sharding import shard_model

    with pytest.raises(ValueError, match="fsdp2"):
        shard_model(torch.nn.Linear(2, 2), "zero2")
