"""Megatron .bin/.idx access through megatron.core's IndexedDataset (stable API only).

Only these megatron.core names are used, present from 0.5 through 0.19:
``IndexedDataset(prefix)`` with ``sequence_lengths``, ``document_indices``, ``get(idx, offset,
length)`` and integer indexing, and ``IndexedDatasetBuilder(bin_path, dtype)`` with
``add_document(array, lengths)`` and ``finalize(idx_path)``.

A *document* is the span of sequences ``document_indices[d]:document_indices[d+1]`` (one
sequence per document unless the data was preprocessed with sentence splitting); its tokens
are the concatenation of those sequences. megatron.core (and torch) are imported lazily so
that length-only users (the planner process) stay light.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np


def _unique() -> str:
    """Temporary-name suffix unique across hosts sharing a file system."""
    import socket

    return f"{socket.gethostname()}.{os.getpid()}"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def check_prefix(prefix: str) -> None:
    """Clear error naming the missing file(s) of a data prefix."""
    missing = [p for p in (idx_path(prefix), bin_path(prefix)) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = " (pass the prefix without the .bin/.idx suffix)"
        raise FileNotFoundError(f"data prefix {prefix!r}: missing {', '.join(missing)}{hint}")


def open_indexed(prefix: str):
    """megatron.core IndexedDataset for ``prefix`` (memory-mapped)."""
    check_prefix(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=False, mmap=True)


def document_token_counts(ds) -> np.ndarray:
    """Tokens per document (int64), from the index only (no token reads)."""
    seq_lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
    cum = np.zeros(len(seq_lengths) + 1, dtype=np.int64)
    np.cumsum(seq_lengths, out=cum[1:])
    return cum[doc_idx[1:]] - cum[doc_idx[:-1]]


def read_document(ds, doc: int, max_tokens: int | None = None) -> np.ndarray:
    """The first ``max_tokens`` tokens (all if None) of document ``doc`` as int64."""
    doc_idx = ds.document_indices
    first, last = int(doc_idx[doc]), int(doc_idx[doc + 1])
    parts = []
    remaining = max_tokens
    for s in range(first, last):
        n = int(ds.sequence_lengths[s])
        if remaining is not None:
            if remaining <= 0:
                break
            n = min(n, remaining)
            remaining -= n
        if n > 0:
            parts.append(np.asarray(ds.get(s, 0, n), dtype=np.int64))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)


class DocumentWriter:
    """Writes one sequence per document to ``prefix``.bin/.idx, atomically.

    Files are written under temporary names and renamed on a clean exit (.bin first, .idx
    last), so a crash never leaves a half-written dataset that looks complete.
    """

    def __init__(self, prefix: str, dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._info = np.iinfo(self.dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp = f"{prefix}.tmp{_unique()}"
        self._builder = IndexedDatasetBuilder(bin_path(self._tmp), dtype=self.dtype.type)
        self.documents = 0
        self.tokens = 0

    def add(self, doc) -> None:
        arr = np.asarray(doc)
        if arr.ndim != 1:
            raise ValueError(f"document {self.documents}: expected a 1-D token array, got shape {arr.shape}")
        if arr.size and (int(arr.min()) < self._info.min or int(arr.max()) > self._info.max):
            raise ValueError(
                f"document {self.documents}: token id out of range for {self.dtype.name} "
                f"[{int(arr.min())}, {int(arr.max())}]"
            )
        self._builder.add_document(arr.astype(self.dtype, copy=False), [int(arr.size)])
        self.documents += 1
        self.tokens += int(arr.size)

    def __enter__(self) -> "DocumentWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._builder.finalize(idx_path(self._tmp))
                os.replace(bin_path(self._tmp), bin_path(self.prefix))
                os.replace(idx_path(self._tmp), idx_path(self.prefix))
            else:
                data_file = getattr(self._builder, "data_file", None)  # builder internals may change
                if data_file is not None:
                    data_file.close()
        finally:
            for p in (bin_path(self._tmp), idx_path(self._tmp)):
                if os.path.exists(p):
                    os.remove(p)


def write_documents(prefix: str, documents: Iterable[Iterable[int] | np.ndarray], dtype) -> tuple[int, int]:
    """Write ``documents`` (token arrays) to ``prefix``.bin/.idx; returns (documents, tokens)."""
    with DocumentWriter(prefix, dtype) as w:
        for doc in documents:
            w.add(doc)
    return w.documents, w.tokens
