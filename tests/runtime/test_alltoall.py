"""Ulysses exchanges on 4 gloo ranks against slicing the full tensors in one process."""

import pytest
import torch

from megatron.flexsp.runtime.alltoall import check_heads, kv_replication
from tests.dist_utils import run_distributed

GROUPS = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]


def _full(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _exchange_body(rank, ws):
    from megatron.flexsp.runtime.alltoall import AllToAllStats, head_to_seq, seq_to_head
    from megatron.flexsp.runtime.group_pool import GroupPool

    pool = GroupPool(GROUPS)
    out = []
    for degree in (1, 2, 4):
        ranks = tuple(range(rank // degree * degree, rank // degree * degree + degree))
        group, me, s = pool.get(ranks), ranks.index(rank), 3
        T = s * degree
        # three tensors with different head counts and head dims, one collective
        shapes = [(T, 4, 5), (T, 8, 2), (T, 4, 3)]
        full = [_full(sh, 10 * i + ranks[0]) for i, sh in enumerate(shapes)]
        w = [_full((T, sh[1] // degree, sh[2]), 100 + 10 * i + rank) for i, sh in enumerate(shapes)]
        local = [f[me * s : (me + 1) * s].clone().requires_grad_(True) for f in full]
        stats = AllToAllStats()
        heads = seq_to_head(local, group, stats)
        # rank `me` holds head chunk `me` of the whole sequence, tokens in packed order
        fwd_err = max(
            (h - f[:, me * (f.shape[1] // degree) : (me + 1) * (f.shape[1] // degree)]).abs().max().item()
            for h, f in zip(heads, full)
        )
        back = head_to_seq(heads, group, stats)
        round_err = max((b - x).abs().max().item() for b, x in zip(back, local))
        calls_fwd, bytes_fwd = stats.calls, stats.bytes
        # gradient of sum(w * heads): each rank's weights land on its chunk; gather the full
        # weight tensor per input by all-gathering in one process-free way: recompute them here.
        loss = sum((h * wi).sum() for h, wi in zip(heads, w))
        loss.backward()
        grad_err = 0.0
        for i, (x, sh) in enumerate(zip(local, shapes)):
            hp = sh[1] // degree
            expect = torch.cat([_full((T, hp, sh[2]), 100 + 10 * i + ranks[j]) for j in range(degree)], dim=1)
            grad_err = max(grad_err, (x.grad - expect[me * s : (me + 1) * s]).abs().max().item())
        # and head_to_seq's backward is seq_to_head
        y = [_full((T, sh[1] // degree, sh[2]), 7 + ranks[0] * 10 + me).requires_grad_(True) for sh in shapes]
        z = head_to_seq(y, group, stats)
        gz = [_full(t.shape, 300 + me) for t in z]
        torch.autograd.backward(z, gz)
        expect_gy = seq_to_head(gz, group)
        gy_err = max((a.grad - b).abs().max().item() for a, b in zip(y, expect_gy))
        out.append(
            dict(
                degree=degree,
                fwd=fwd_err,
                round=round_err,
                grad=grad_err,
                gy=gy_err,
                calls_fwd=calls_fwd,
                bytes_fwd=bytes_fwd,
                calls=stats.calls,
                expect_bytes_fwd=0 if degree == 1 else 2 * s * sum(sh[1] * sh[2] for sh in shapes) * 8,
                bytes_remote=stats.bytes_remote,
                bytes=stats.bytes,
            )
        )
    return out


def test_exchanges_match_slicing_and_are_each_others_backward():
    res = run_distributed(_exchange_body, 4, timeout=120)
    for rank, cases in enumerate(res):
        for c in cases:
            assert c["fwd"] == 0.0 and c["round"] == 0.0, (rank, c)
            assert c["grad"] == 0.0 and c["gy"] == 0.0, (rank, c)
            d = c["degree"]
            if d == 1:  # identity: no communication at all
                assert c["calls"] == 0 and c["bytes"] == 0
            else:  # one collective per direction for all three tensors
                assert c["calls_fwd"] == 2 and c["bytes_fwd"] == c["expect_bytes_fwd"], (rank, c)
                # + seq_to_head backward, then head_to_seq forward and backward (expect_gy uses the global stats)
                assert c["calls"] == 5
                assert c["bytes_remote"] == c["bytes"] * (d - 1) // d


@pytest.mark.parametrize(
    "heads,kv,degree",
    [
        (8, 8, 4),
        (8, 2, 2),
        (8, 2, 4),
        (8, 2, 8),
        (8, 1, 8),
        (12, 4, 6),
        (12, 3, 4),
        (12, 3, 6),
        (16, 4, 16),
        (6, 6, 3),
        (32, 8, 16),
    ],
)
def test_kv_replication_gives_each_rank_its_queries_kv_heads(heads, kv, degree):
    e = kv_replication(heads, kv, degree)
    g = heads // kv
    assert g % e == 0 and (kv * e) % degree == 0
    assert all(not (g % f == 0 and (kv * f) % degree == 0) for f in range(1, e))  # smallest such e
    # brute force: replicated kv head r is original kv head r // e; rank j holds replicated heads
    # [j*kv*e/P, (j+1)*kv*e/P) and query heads [j*H/P, (j+1)*H/P); local GQA maps local query
    # head i to local kv head i // (H / (kv*e)). It must be the original kv head of the query.
    hq_l, hk_l = heads // degree, kv * e // degree
    for j in range(degree):
        for i in range(hq_l):
            q_head = j * hq_l + i
            local_kv = i // (hq_l // hk_l)
            assert (j * hk_l + local_kv) // e == q_head // g


def test_check_heads_errors():
    with pytest.raises(ValueError, match="SP degree 4 does not divide the number of attention heads 6"):
        check_heads(6, 2, 4)
    with pytest.raises(ValueError, match="not a multiple of the kv heads 4"):
        check_heads(6, 4, 2)
    check_heads(6, 3, 6)
