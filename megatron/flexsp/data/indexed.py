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
from collections.abc import Iterable

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


# Megatron's .idx layout (megatron/core/datasets/indexed_dataset.py, stable since 2019): magic, version
# (u64 = 1), dtype code (u8), sequence count (u64), document-index count (u64), then int32 sequence
# lengths, int64 byte pointers into .bin, int64 document indices.
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# dtype codes of megatron.core's DType enum
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_validated: dict[tuple, None] = {}
_CHUNK = 1 << 22  # index entries checked at a time (bounded memory for huge corpora)


def validate_indexed(prefix: str) -> None:
    """Check ``prefix``.idx against the format and ``prefix``.bin against the index; ValueError naming the file.

    Why: megatron.core asserts on a bad magic or version (an AssertionError traceback on one rank
    while its peers hang in a broadcast), and a ``.bin`` shorter than its index passes start-up and
    fails mid-training at the first document past the end. Reads only the index (no tokens); the
    result is cached per (file, size, mtime)."""
    check_prefix(prefix)
    ip, bp = idx_path(prefix), bin_path(prefix)
    ist, bst = os.stat(ip), os.stat(bp)
    key = (os.path.abspath(prefix), ist.st_size, ist.st_mtime_ns, bst.st_size, bst.st_mtime_ns)
    if key in _validated:
        return
    if ist.st_size < _IDX_HEADER_BYTES:
        raise ValueError(f"{ip}: {ist.st_size} bytes, too short for a Megatron index header (truncated?)")
    with open(ip, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    if header[:9] != IDX_MAGIC:
        raise ValueError(f"{ip}: bad magic {header[:9]!r}, not a Megatron .idx index (expected {IDX_MAGIC!r})")
    version = int.from_bytes(header[9:17], "little")
    if version != IDX_VERSION:
        raise ValueError(f"{ip}: index format version {version}, this reader supports version {IDX_VERSION}")
    code = header[17]
    if code not in _DTYPE_CODES:
        raise ValueError(f"{ip}: unknown token dtype code {code} (known: {sorted(_DTYPE_CODES)})")
    itemsize = np.dtype(_DTYPE_CODES[code]).itemsize
    n_seq = int.from_bytes(header[18:26], "little")
    n_doc = int.from_bytes(header[26:34], "little")
    need = _IDX_HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if ist.st_size < need:
        raise ValueError(
            f"{ip}: {ist.st_size} bytes, but its header announces {n_seq} sequences and {n_doc} "
            f"document indices ({need} bytes): the index is truncated"
        )
    mm = np.memmap(ip, mode="r", dtype=np.uint8)
    try:
        off = _IDX_HEADER_BYTES
        lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=off)
        pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        ok = n_doc >= 1 and docs[0] == 0 and docs[-1] == n_seq
        # in chunks: a corpus index can have billions of entries, the check must not copy them all
        for a in range(0, max(n_doc - 1, 0), _CHUNK):
            if not ok:
                break
            seg = docs[a : a + _CHUNK + 1]
            ok = not bool(np.any(seg[1:] < seg[:-1]))
        if not ok:
            raise ValueError(
                f"{ip}: document indices are not a non-decreasing list from 0 to the {n_seq} sequences "
                "(a damaged index)"
            )
        needed, first = 0, None
        for a in range(0, n_seq, _CHUNK):
            ln, pt = lengths[a : a + _CHUNK], pointers[a : a + _CHUNK]
            if bool(np.any(ln < 0)) or bool(np.any(pt < 0)):
                raise ValueError(f"{ip}: negative sequence length or pointer (a damaged index)")
            end = pt + ln.astype(np.int64) * itemsize
            needed = max(needed, int(end.max()))
            if first is None and bool(np.any(end > bst.st_size)):
                first = a + int(np.argmax(end > bst.st_size))
        if first is not None:
            doc = int(np.searchsorted(docs, first, side="right")) - 1
            raise ValueError(
                f"{bp}: {bst.st_size} bytes, but {ip} needs {needed}: the .bin is truncated "
                f"(document {doc} onwards is missing)"
            )
    finally:
        del mm
    _validated[key] = None


def open_indexed(prefix: str):
    """megatron.core IndexedDataset for ``prefix`` (memory-mapped), after ``validate_indexed``."""
    validate_indexed(prefix)
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

    def __enter__(self) -> DocumentWriter:
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
