"""Pack one SP group's sequences (THD) and cut this rank's contiguous slice.

Why contiguous equal slices: the Ulysses exchange needs the same token count on every rank of
the group and rebuilds the packed order by stacking slices in rank order, so attention after
the exchange sees whole documents. Padding is only what the exchange (degree) and the backend
(``pad_multiple``) need, appended once at the end as its own pseudo-sequence so it attends to
nothing real and nothing real attends to it.

Length convention (DESIGN.md): a document is a 1-D int64 tensor of L + 1 ids; the model input
is ``doc[:-1]`` and the labels are ``doc[1:]``, so a label never crosses a document boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedSlice", "pack_group", "padded_length"]


@dataclass
class PackedSlice:
    """This rank's share of a packed group, plus the packed group's layout.

    Token tensors are ``[1, n_local]`` (batch of one packed row). ``cu_seqlens`` (int32, CPU)
    describes the whole padded packed group, padding included as the last pseudo-sequence.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float: 1 for real tokens, 0 for padding
    position_ids: torch.Tensor  # restart at 0 at every sequence
    cu_seqlens: torch.Tensor
    max_seqlen: int
    total_tokens: int  # real (unpadded) tokens of the whole group
    num_padded: int  # padding tokens appended to the group
    seq_lengths: list[int]  # L_i of the group's sequences, in packing order
    degree: int
    rank_in_group: int

    @property
    def n_local(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def local_range(self) -> tuple[int, int]:
        """[start, end) of this slice in the packed group."""
        return self.rank_in_group * self.n_local, (self.rank_in_group + 1) * self.n_local

    @property
    def local_tokens(self) -> int:
        """Real tokens in this slice (those with loss_mask 1)."""
        start, end = self.local_range
        return max(0, min(end, self.total_tokens) - start)


def padded_length(total_tokens: int, degree: int, pad_multiple: int = 1) -> int:
    """Smallest multiple of lcm(degree, pad_multiple) holding ``total_tokens`` (at least one block)."""
    m = math.lcm(degree, pad_multiple)
    return max(m, -(-total_tokens // m) * m)


def _document(i: int, s: torch.Tensor) -> torch.Tensor:
    """Document ``i`` as int64 on the CPU; ValueError naming it unless it is 1-D integer ids, at least 2."""
    if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.dtype.is_floating_point or s.dtype == torch.bool:
        raise ValueError(
            f"pack_group: sequence {i} must be a 1-D integer tensor, got "
            f"{getattr(s, 'dtype', type(s))} of shape {tuple(getattr(s, 'shape', ()))}"
        )
    if s.numel() < 2:
        raise ValueError(
            f"pack_group: sequence {i} has {s.numel()} ids; a document needs at least 2 "
            f"(L + 1 ids for L >= 1 input tokens)"
        )
    return s.to(torch.long).cpu()


def pack_group(
    seqs: Sequence[torch.Tensor], rank_in_group: int, degree: int, pad_multiple: int = 1, pad_token_id: int = 0
) -> PackedSlice:
    """Concatenate the group's documents and return rank ``rank_in_group``'s contiguous slice.

    ``seqs``: the group's documents (1-D integer tensors of L_i + 1 ids, L_i >= 1), in the order
    the plan lists them. An empty group yields one block of padding only (loss_mask all 0),
    so its ranks can still run forward and backward with everybody else.
    """
    if degree < 1:
        raise ValueError(f"pack_group: degree must be >= 1, got {degree}")
    if not 0 <= rank_in_group < degree:
        raise ValueError(f"pack_group: rank_in_group {rank_in_group} is outside 0..{degree - 1}")
    if pad_multiple < 1:
        raise ValueError(f"pack_group: pad_multiple must be >= 1, got {pad_multiple}")
    inputs, labels, positions, lengths = [], [], [], []
    for i, s in enumerate(seqs):
        s = _document(i, s)
        inputs.append(s[:-1])
        labels.append(s[1:])
        positions.append(torch.arange(s.numel() - 1, dtype=torch.long))
        lengths.append(s.numel() - 1)
    total = sum(lengths)
    padded = padded_length(total, degree, pad_multiple)
    num_pad = padded - total
    if num_pad:
        inputs.append(torch.full((num_pad,), pad_token_id, dtype=torch.long))
        labels.append(torch.full((num_pad,), pad_token_id, dtype=torch.long))
        positions.append(torch.arange(num_pad, dtype=torch.long))
    seg_lengths = lengths + ([num_pad] if num_pad else [])
    cu = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lengths, dtype=torch.long), 0).to(torch.int32)
    mask = torch.zeros(padded, dtype=torch.float32)
    mask[:total] = 1.0

    n_local = padded // degree
    sl = slice(rank_in_group * n_local, (rank_in_group + 1) * n_local)
    cat = lambda xs: torch.cat(xs)[sl].unsqueeze(0).contiguous()  # noqa: E731
    return PackedSlice(
        input_ids=cat(inputs),
        labels=cat(labels),
        loss_mask=mask[sl].unsqueeze(0).contiguous(),
        position_ids=cat(positions),
        cu_seqlens=cu,
        max_seqlen=max(seg_lengths),
        total_tokens=total,
        num_padded=num_pad,
        seq_lengths=lengths,
        degree=degree,
        rank_in_group=rank_in_group,
    )
