"""Document-level datasets: one document is one training sequence (no packing into windows).

Length convention (shared with the planner and runtime): a kept document i is returned as
``L_i + 1`` token ids (model input ``seq[:-1]``, labels ``seq[1:]``) and ``lengths[i] == L_i``.
``seq_length`` is the largest L kept. A document with more than ``seq_length + 1`` tokens is
truncated to its first ``seq_length + 1`` tokens or dropped (``overlong``); documents with
fewer than 2 tokens are skipped. Every decision is counted in ``DocumentStats`` for logging.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from megatron.flexsp.data import indexed

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class DocumentStats:
    """What the length filter did, for logs (sums over blends with ``+``)."""

    documents: int = 0  # documents looked at
    kept: int = 0
    truncated: int = 0  # kept, but cut to seq_length + 1 tokens
    dropped_overlong: int = 0
    skipped_short: int = 0  # fewer than 2 tokens
    raw_tokens: int = 0  # tokens of all documents looked at
    kept_tokens: int = 0  # tokens returned for kept documents (sum of L_i + 1)

    def __add__(self, other: DocumentStats) -> DocumentStats:
        return DocumentStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        return asdict(self)


def check_overlong(overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {overlong!r}")


def select_documents(token_counts: np.ndarray, seq_length: int, overlong: str = "truncate"):
    """Apply the length convention to raw per-document token counts.

    Returns (positions of kept documents in ``token_counts``, their L, DocumentStats).
    """
    check_overlong(overlong)
    if int(seq_length) < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    counts = np.asarray(token_counts, dtype=np.int64)
    short = counts < 2
    over = counts > seq_length + 1
    keep = ~short if overlong == "truncate" else ~short & ~over
    positions = np.flatnonzero(keep).astype(np.int64)
    lengths = np.minimum(counts[positions], seq_length + 1) - 1
    stats = DocumentStats(
        documents=int(counts.size),
        kept=int(positions.size),
        truncated=int(np.count_nonzero(over)) if overlong == "truncate" else 0,
        dropped_overlong=int(np.count_nonzero(over)) if overlong == "drop" else 0,
        skipped_short=int(np.count_nonzero(short)),
        raw_tokens=int(counts.sum()),
        kept_tokens=int((lengths + 1).sum()),
    )
    return positions, lengths.astype(np.int64), stats


class DocumentDataset:
    """Base: ``lengths`` (np.int64, L per document), ``stats``, ``__getitem__`` -> L+1 ids."""

    name: str = "documents"
    lengths: np.ndarray
    stats: DocumentStats

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: document index {i} out of range [0, {n})")
        seq = self._read(i)
        if seq.shape[0] != self.lengths[i] + 1:  # the planner trusts lengths: never let them drift
            raise RuntimeError(f"{self.name}: document {i} read {seq.shape[0]} ids, index says {self.lengths[i] + 1}")
        return seq

    def _read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Model-input tokens (sum of L)."""
        return int(self.lengths.sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, documents={len(self)}, tokens={self.num_tokens})"


class IndexedDocuments(DocumentDataset):
    """Documents ``[start, stop)`` of a Megatron .bin/.idx prefix, filtered by the length rule."""

    def __init__(
        self,
        prefix: str,
        seq_length: int,
        overlong: str = "truncate",
        doc_range: tuple[int, int] | None = None,
    ) -> None:
        self.prefix = prefix
        self.name = prefix
        self.seq_length = int(seq_length)
        ds = indexed.open_indexed(prefix)
        counts = indexed.document_token_counts(ds)
        self.total_documents = int(counts.size)
        start, stop = doc_range if doc_range is not None else (0, counts.size)
        if not 0 <= start <= stop <= counts.size:
            raise ValueError(f"{prefix}: document range [{start}, {stop}) outside [0, {counts.size})")
        self.doc_range = (int(start), int(stop))
        positions, self.lengths, self.stats = select_documents(counts[start:stop], seq_length, overlong)
        self.doc_ids = positions + start  # raw document number in the file
        self._ds = ds

    def _read(self, i: int) -> np.ndarray:
        if self._ds is None:
            self._ds = indexed.open_indexed(self.prefix)
        return indexed.read_document(self._ds, int(self.doc_ids[i]), int(self.lengths[i]) + 1)

    def __getstate__(self):  # reopen the memory map in the receiving process
        state = self.__dict__.copy()
        state["_ds"] = None
        return state
