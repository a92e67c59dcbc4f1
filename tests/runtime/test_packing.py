"""pack_group against a token-by-token reference."""

import math

import pytest
import torch

from megatron.flexsp.runtime.packing import pack_group, padded_length


def _reference(docs, degree, pad_multiple):
    """Per token: (input, label, position, mask, document index); padding appended as doc -1."""
    rows = []
    for i, d in enumerate(docs):
        for t in range(len(d) - 1):
            rows.append((int(d[t]), int(d[t + 1]), t, 1.0, i))
    total = len(rows)
    m = math.lcm(degree, pad_multiple)
    padded = max(m, -(-total // m) * m)
    for t in range(padded - total):
        rows.append((0, 0, t, 0.0, -1))
    return rows, total


def _docs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (L + 1,), generator=g) for L in lengths]


@pytest.mark.parametrize("lengths", [[1], [5, 1, 17, 2], [300, 1, 1, 64, 9, 2], [8, 8]])
@pytest.mark.parametrize("degree", [1, 2, 4, 8])
@pytest.mark.parametrize("pad_multiple", [1, 3, 16])
def test_slices_rebuild_the_reference(lengths, degree, pad_multiple):
    docs = _docs(lengths, seed=sum(lengths) + degree)
    rows, total = _reference(docs, degree, pad_multiple)
    slices = [pack_group(docs, r, degree, pad_multiple) for r in range(degree)]
    n = slices[0].n_local
    assert all(s.n_local == n for s in slices) and n * degree == len(rows)
    cat = lambda name: torch.cat([getattr(s, name) for s in slices], dim=1).squeeze(0).tolist()  # noqa: E731
    assert cat("input_ids") == [r[0] for r in rows]
    assert cat("labels") == [r[1] for r in rows]
    assert cat("position_ids") == [r[2] for r in rows]
    assert cat("loss_mask") == [r[3] for r in rows]
    for s in slices:
        assert s.input_ids.shape == s.labels.shape == s.loss_mask.shape == s.position_ids.shape == (1, n)
        assert s.loss_mask.dtype == torch.float32 and s.input_ids.dtype == torch.long
        assert s.total_tokens == total == sum(lengths)
        assert s.seq_lengths == list(lengths)
        assert s.num_padded == len(rows) - total
        # padding only as much as needed: less than one lcm block (or one block for tiny groups)
        assert s.num_padded < math.lcm(degree, pad_multiple)
        # cu_seqlens = document boundaries, padding as its own last pseudo-document
        bounds = [0]
        for i in range(len(rows)):
            if i + 1 == len(rows) or rows[i + 1][4] != rows[i][4]:
                bounds.append(i + 1)
        assert s.cu_seqlens.dtype == torch.int32 and s.cu_seqlens.tolist() == bounds
        assert s.max_seqlen == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    assert sum(s.local_tokens for s in slices) == total
    assert [s.local_tokens for s in slices] == [int(s.loss_mask.sum()) for s in slices]


def test_labels_never_cross_documents():
    docs = [torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30, 31, 32, 33])]
    s = pack_group(docs, 0, 1)
    # the label of each document's last input token is that document's own last id
    assert s.input_ids.tolist() == [[10, 11, 20, 30, 31, 32]]
    assert s.labels.tolist() == [[11, 12, 21, 31, 32, 33]]
    assert s.position_ids.tolist() == [[0, 1, 0, 0, 1, 2]]
    assert s.num_padded == 0 and s.cu_seqlens.tolist() == [0, 2, 3, 6]


def test_empty_group_is_one_padding_block():
    s = [pack_group([], r, 4, 2) for r in range(4)]
    assert all(x.n_local == 1 and x.total_tokens == 0 and x.loss_mask.sum() == 0 for x in s)
    assert s[0].cu_seqlens.tolist() == [0, 4] and s[0].num_padded == 4


def test_packed_seq_params():
    from megatron.flexsp.runtime.sp_group import packed_seq_params

    s = pack_group(_docs([3, 5], 0), 1, 2, 4)
    p = packed_seq_params(s)
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 3, 8] and p.cu_seqlens_kv is p.cu_seqlens_q
    assert p.max_seqlen_q == p.max_seqlen_kv == 5
    assert p.cp_group is None and p.local_cp_size is None  # no group: the data states degree 1
    on = packed_seq_params(s, device="cpu")
    assert on.cu_seqlens_q.dtype == torch.int32 and on.cu_seqlens_q.tolist() == [0, 3, 8]
    assert padded_length(0, 2, 3) == 6 and padded_length(7, 2, 3) == 12 and padded_length(12, 2, 3) == 12


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="sequence 1 has 1 ids"):
        pack_group([torch.tensor([1, 2]), torch.tensor([3])], 0, 1)
    with pytest.raises(ValueError, match="sequence 0 must be a 1-D integer tensor"):
        pack_group([torch.tensor([1.0, 2.0])], 0, 1)
    with pytest.raises(ValueError, match="sequence 0 must be a 1-D integer tensor"):
        pack_group([torch.tensor([[1, 2]])], 0, 1)
    with pytest.raises(ValueError, match="rank_in_group 2 is outside 0..1"):
        pack_group([torch.tensor([1, 2])], 2, 2)
    with pytest.raises(ValueError, match="degree must be >= 1"):
        pack_group([torch.tensor([1, 2])], 0, 0)
