"""FlexSPCoreAttention on 4 gloo ranks equals single-process attention on the same packed documents.

Reference: dense attention with an explicit block-diagonal causal mask, built token by token
(independent of the module's per-document SDPA loop and of the all-to-all).
"""

import contextlib
import importlib.util
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed

GROUPS = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]
# (query heads, kv heads, head dim): MHA, GQA with degree <= kv heads, GQA and MQA with degree > kv heads.
HEAD_CASES = [(4, 4, 8), (4, 2, 8), (8, 2, 4), (4, 1, 8)]
# Very different lengths in one group: 1-token and 1-2 hundred-token documents together.
LENGTHS = [1, 57, 3, 203, 11, 2]


def _config(hq, hkv, d):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=hq * d,
        num_attention_heads=hq,
        num_query_groups=hkv,
        kv_channels=d,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _reference(q, k, v, bounds, scale):
    """Dense masked attention; q [T, h, d], k/v [T, hk, d]; mask[i, j] = same document and j <= i."""
    T, h, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    doc = torch.empty(T, dtype=torch.long)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc[a:b] = i
    pos = torch.arange(T)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def _lengths_for(group_id, case_id):
    g = torch.Generator().manual_seed(1000 * case_id + group_id)
    order = torch.randperm(len(LENGTHS), generator=g).tolist()
    return [LENGTHS[i] + group_id for i in order]  # groups differ in content and total


def _attention_body(rank, ws):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.flexsp.runtime.alltoall import AllToAllStats, kv_replication
    from megatron.flexsp.runtime.attention import FlexSPCoreAttention
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.packing import pack_group
    from megatron.flexsp.runtime.sp_group import packed_seq_params, sp_group

    torch.use_deterministic_algorithms(False)
    pool = GroupPool(GROUPS)
    results = []
    for case_id, (hq, hkv, d) in enumerate(HEAD_CASES):
        cfg = _config(hq, hkv, d)
        stats = AllToAllStats()
        attn = FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", a2a_stats=stats)
        for degree in (1, 2, 4):
            ranks = tuple(range(rank // degree * degree, rank // degree * degree + degree))
            me = ranks.index(rank)
            lengths = _lengths_for(ranks[0], case_id)
            packed = pack_group([torch.zeros(L + 1, dtype=torch.long) for L in lengths], me, degree)
            Tp, s = packed.cu_seqlens[-1].item(), packed.n_local
            gen = torch.Generator().manual_seed(77 + 10 * case_id + ranks[0])  # same on the group's ranks
            q = torch.randn(Tp, hq, d, generator=gen, dtype=torch.float64)
            k = torch.randn(Tp, hkv, d, generator=gen, dtype=torch.float64)
            v = torch.randn(Tp, hkv, d, generator=gen, dtype=torch.float64)
            gout = torch.randn(Tp, hq * d, generator=gen, dtype=torch.float64)
            sl = slice(me * s, (me + 1) * s)
            thd = (case_id + degree) % 2 == 1  # alternate megatron's two input layouts
            ql, kl, vl = (x[sl].clone().requires_grad_(True) for x in (q, k, v))
            inputs = (ql, kl, vl) if thd else tuple(x.unsqueeze(1) for x in (ql, kl, vl))
            stats.reset()
            with sp_group(pool, ranks) as active:
                out = attn(
                    *inputs,
                    None,
                    attn_mask_type=AttnMaskType.causal,
                    packed_seq_params=packed_seq_params(packed, active),
                )
                out.reshape(s, -1).backward(gout[sl].unsqueeze(1).reshape(s, -1))
            calls, nbytes = stats.calls, stats.bytes

            qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
            ref = _reference(qr, kr, vr, packed.cu_seqlens.tolist(), 1.0 / d**0.5).reshape(Tp, hq * d)
            ref.backward(gout)
            e = kv_replication(hq, hkv, degree) if degree > 1 else 1
            per_pass = s * (hq + 2 * hkv * e) * d * 8 + s * hq * d * 8  # qkv exchange + output exchange
            results.append(
                dict(
                    case=(hq, hkv, d, degree, "thd" if thd else "sbhd"),
                    shape=tuple(out.shape),
                    out=(out.reshape(s, -1) - ref[sl]).abs().max().item(),
                    dq=(ql.grad - qr.grad[sl]).abs().max().item(),
                    dk=(kl.grad - kr.grad[sl]).abs().max().item(),
                    dv=(vl.grad - vr.grad[sl]).abs().max().item(),
                    calls=calls,
                    expect_calls=0 if degree == 1 else 4,
                    bytes=nbytes,
                    expect_bytes=0 if degree == 1 else 2 * per_pass,
                    s=s,
                    pad=packed.num_padded,
                )
            )
    return results


def test_alltoall_attention_matches_single_process():
    t0 = time.monotonic()
    res = run_distributed(_attention_body, 4, timeout=150)
    for rank, results in enumerate(res):
        assert len(results) == len(HEAD_CASES) * 3
        for r in results:
            hq, hkv, d, degree, layout = r["case"]
            assert r["shape"] == (r["s"], 1, hq * d), r
            for key in ("out", "dq", "dk", "dv"):
                assert r[key] < 1e-10, (rank, r)
            assert (r["calls"], r["bytes"]) == (r["expect_calls"], r["expect_bytes"]), (rank, r)
    # the varied lengths really did need padding for some degree (so padding is exercised)
    assert any(r["pad"] > 0 for results in res for r in results)
    assert time.monotonic() - t0 < 150


def _bad_degree_body(rank, ws):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.sp_group import sp_group

    def one_document(active):  # the group travels with the data: one document over the group's slices
        cu = torch.tensor([0, 4 * active.world_size], dtype=torch.int32)
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cp_group=active.group, local_cp_size=active.world_size
        )

    pool = GroupPool(GROUPS)
    attn = FlexSPCoreAttention(_config(6, 2, 4), 1, AttnMaskType.causal, "self")
    q, kv = torch.randn(4, 1, 6, 4), torch.randn(4, 1, 2, 4)
    out = {}
    with sp_group(pool, (0, 1) if rank < 2 else (2, 3)) as active:  # 2 divides 6 heads: fine
        out["deg2_shape"] = tuple(attn(q, kv, kv, None, packed_seq_params=one_document(active)).shape)
    t0 = time.monotonic()
    try:
        with sp_group(pool, (0, 1, 2, 3)) as active:
            attn(q, kv, kv, None, packed_seq_params=one_document(active))
        out["deg4"] = None
    except ValueError as e:
        out["deg4"] = str(e)
    out["elapsed"] = time.monotonic() - t0
    dist.barrier()
    return out


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_degree_not_dividing_heads_fails_on_every_rank():
    res = run_distributed(_bad_degree_body, 4, timeout=60, pg_timeout=30)
    for out in res:
        assert out["deg2_shape"] == (4, 1, 24)
        assert out["deg4"] and "SP degree 4 does not divide the number of attention heads 6" in out["deg4"]
        assert out["elapsed"] < 5.0


def test_backend_errors_are_clear():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention

    cfg = _config(4, 2, 8)
    with pytest.raises(ValueError, match="unknown FlexSP attention backend 'xla'"):
        FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", backend="xla")
    with pytest.raises(NotImplementedError, match="causal-only"):
        FlexSPCoreAttention(cfg, 1, AttnMaskType.no_mask, "self")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="'flash-attn' package"):
            FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", backend="flash")
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ImportError, match="'transformer-engine' package"):
            FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", backend="te")
    attn = FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self")
    q, kv = torch.randn(6, 2, 4, 8), torch.randn(6, 2, 2, 8)
    with pytest.raises(ValueError, match="batch 1"):
        attn(q, kv, kv, None)


def test_single_process_kernel_matches_reference_without_group():
    """Degree 1 outside any group (no torch.distributed): sdpa per document equals the dense reference."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention

    g = torch.Generator().manual_seed(3)
    bounds = [0, 1, 40, 43, 120]
    q = torch.randn(120, 8, 4, generator=g, dtype=torch.float64)
    k = torch.randn(120, 2, 4, generator=g, dtype=torch.float64)
    v = torch.randn(120, 2, 4, generator=g, dtype=torch.float64)
    cu = torch.tensor(bounds, dtype=torch.int32)
    attn = FlexSPCoreAttention(_config(8, 2, 4), 1, AttnMaskType.causal, "self", softmax_scale=0.3)
    out = attn(
        q.unsqueeze(1),
        k.unsqueeze(1),
        v.unsqueeze(1),
        None,
        packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu),
    )
    ref = _reference(q, k, v, bounds, 0.3).reshape(120, 1, 32)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # no packed_seq_params: the whole row is one causal document
    out1 = attn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), None)
    torch.testing.assert_close(out1, _reference(q, k, v, [0, 120], 0.3).reshape(120, 1, 32), rtol=0, atol=1e-12)


def test_flash_and_te_backends_get_the_packed_layout(monkeypatch):
    """The GPU backends' plumbing on CPU: fake kernels check the arguments they receive and
    compute the dense reference, so wrong boundaries, scale, dtype or output shape fail here."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.flexsp.runtime import attention as A

    bounds = [0, 5, 6, 30]
    calls = []

    def fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert cu_q.dtype == torch.int32 and cu_q.tolist() == bounds and cu_k is cu_q
        assert (max_q, max_k, causal, dropout_p) == (24, 24, True, 0.0)
        assert q.stride(-1) == 1 and k.shape[1] == 2 and q.shape[1] == 4
        calls.append("flash")
        return _reference(q.double(), k.double(), v.double(), bounds, softmax_scale).to(q.dtype)

    class FakeTEDotProductAttention:
        def __init__(self, **kw):
            assert kw["qkv_format"] == "thd" and kw["attn_mask_type"] == "padding_causal"
            assert (kw["num_attention_heads"], kw["num_gqa_groups"], kw["kv_channels"]) == (4, 2, 8)
            self.scale = kw["softmax_scale"]

        def __call__(self, q, k, v, **kw):
            assert kw["qkv_format"] == "thd" and kw["attn_mask_type"] == "padding_causal"
            assert kw["cu_seqlens_q"].dtype == torch.int32 and kw["cu_seqlens_q"].tolist() == bounds
            assert kw["max_seqlen_q"] == kw["max_seqlen_kv"] == 24 and q.is_contiguous()
            calls.append("te")
            out = _reference(q.double(), k.double(), v.double(), bounds, self.scale).to(q.dtype)
            return out.reshape(q.shape[0], -1)  # TE returns [t, h*d]

    class FakeTE:
        DotProductAttention = FakeTEDotProductAttention

    real_require = A._require
    monkeypatch.setattr(
        A, "_require", lambda b: fake_flash if b == "flash" else FakeTE if b == "te" else real_require(b)
    )
    g = torch.Generator().manual_seed(5)
    # bf16 like a real run (the kernels reject fp32); the fakes compute in fp64 and round once.
    q = torch.randn(30, 1, 4, 8, generator=g, dtype=torch.float64).bfloat16()
    k = torch.randn(30, 1, 2, 8, generator=g, dtype=torch.float64).bfloat16()
    v = torch.randn(30, 1, 2, 8, generator=g, dtype=torch.float64).bfloat16()
    cu = torch.tensor(bounds, dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=24, max_seqlen_kv=24)
    ref = _reference(*(x.squeeze(1).double() for x in (q, k, v)), bounds, 0.25).bfloat16().reshape(30, 1, 32)
    for backend in ("flash", "te"):
        attn = A.FlexSPCoreAttention(
            _config(4, 2, 8), 1, AttnMaskType.causal, "self", backend=backend, softmax_scale=0.25
        )
        out = attn(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=psp)  # thd input
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        # fp32 (or fp64) tensors stop with a clear error before reaching the kernel
        with pytest.raises(ValueError, match=f"attention backend '{backend}' needs bf16/fp16 tensors"):
            attn(*(x.squeeze(1).float() for x in (q, k, v)), None, packed_seq_params=psp)
    assert calls == ["flash", "te"]


def _group_with_data_body(rank, ws):
    """One carrier: the same degree-2 attention with the group carried by packed_seq_params inside
    its sp_group, outside any sp_group, and while a *different* group is active in parallel_state
    (the data's group wins); without a group on the data, attention runs degree 1 even inside a
    degree-2 sp_group (it never asks parallel_state)."""
    import dataclasses

    from megatron.core.transformer.enums import AttnMaskType

    from megatron.flexsp.runtime.attention import FlexSPCoreAttention
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.packing import pack_group
    from megatron.flexsp.runtime.sp_group import packed_seq_params, sp_group

    pool = GroupPool(GROUPS)
    hq, hkv, d = 4, 2, 8
    attn = FlexSPCoreAttention(_config(hq, hkv, d), 1, AttnMaskType.causal, "self")
    ranks = (0, 1) if rank < 2 else (2, 3)
    me = ranks.index(rank)
    lengths = _lengths_for(ranks[0], 0)
    packed = pack_group([torch.zeros(L + 1, dtype=torch.long) for L in lengths], me, 2)
    Tp, s = packed.cu_seqlens[-1].item(), packed.n_local
    gen = torch.Generator().manual_seed(5 + ranks[0])
    q, k, v = (torch.randn(Tp, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    gout = torch.randn(Tp, hq * d, generator=gen, dtype=torch.float64)
    sl = slice(me * s, (me + 1) * s)
    base = packed_seq_params(packed)

    def run(psp):
        ql, kl, vl = (x[sl].clone().requires_grad_(True) for x in (q, k, v))
        out = attn(ql.unsqueeze(1), kl.unsqueeze(1), vl.unsqueeze(1), None, packed_seq_params=psp)
        out.reshape(s, -1).backward(gout[sl])
        return [out.detach().reshape(s, -1), ql.grad, kl.grad, vl.grad]

    with sp_group(pool, ranks) as active:
        in_group = run(packed_seq_params(packed, active))
    carried = dataclasses.replace(base, cp_group=pool.get(ranks), local_cp_size=2)
    via_data = run(carried)
    with sp_group(pool, (rank,)):  # parallel_state says degree 1; the data says degree 2
        via_data_inside_other = run(carried)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref = _reference(qr, kr, vr, packed.cu_seqlens.tolist(), 1.0 / d**0.5).reshape(Tp, hq * d)
    ref.backward(gout)
    reference = [ref.detach()[sl], qr.grad[sl], kr.grad[sl], vr.grad[sl]]
    errors = {}
    cases = {
        "size_mismatch": (dataclasses.replace(base, cp_group=pool.get(ranks), local_cp_size=4), None),
        "degree_without_group": (dataclasses.replace(base, local_cp_size=2), None),
        "no_group_inside_sp_group": (base, ranks),  # degree 1 from the data: the slice is not the packed group
    }
    for name, (psp, enter) in cases.items():
        try:
            with sp_group(pool, enter) if enter else contextlib.nullcontext():
                run(psp)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    dist.barrier()
    return dict(
        data_vs_group=max((a - b).abs().max().item() for a, b in zip(via_data, in_group)),
        data_wins=max((a - b).abs().max().item() for a, b in zip(via_data_inside_other, in_group)),
        group_vs_ref=max((a - b).abs().max().item() for a, b in zip(in_group, reference)),
        errors=errors,
        slice_tokens=s,
    )


def test_sp_group_travels_with_packed_seq_params():
    for out in run_distributed(_group_with_data_body, 4, timeout=90):
        assert out["data_vs_group"] == 0.0 and out["data_wins"] == 0.0, out
        assert out["group_vs_ref"] < 1e-10, out
        assert f"to the {out['slice_tokens']} packed tokens" in out["errors"]["no_group_inside_sp_group"]
        assert "local_cp_size 4 differs from the size 2" in out["errors"]["size_mismatch"]
        assert "cp_group is not set" in out["errors"]["degree_without_group"]
