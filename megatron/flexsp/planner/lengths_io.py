"""Sequence lengths for the planner from files, read without torch.

Sources:

* a text file, one length per line (blank lines and lines starting with ``#`` are skipped);
* a ``.npy`` file holding a 1-D integer array;
* a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``, as written by
  ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``): only the ``.idx`` is
  read, with numpy, so the planner never needs torch or the token data.

Text and ``.npy`` values are planned lengths L as they are. A document of the indexed dataset
with n token ids gives L = n - 1 (the model input is ids[:-1], the labels ids[1:]); documents
with fewer than 2 ids are skipped, as the data layer skips them.

Lengths longer than the planned maximum are handled by :func:`apply_max_len`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LengthsError",
    "OverlongReport",
    "read_lengths",
    "read_megatron_document_sizes",
    "apply_max_len",
    "OVERLONG_MODES",
]

_IDX_HEADER = b"MMIDIDX\x00\x00"
OVERLONG_MODES = ("truncate", "drop", "error")


class LengthsError(ValueError):
    """Lengths that cannot be read or used; the message names the file and the problem."""


def read_megatron_document_sizes(prefix: str | Path) -> np.ndarray:
    """Token ids per document (int64) of a Megatron indexed dataset, from ``PREFIX.idx`` only.

    The .idx layout (megatron.core IndexedDataset, version 1): 9-byte magic, u64 version,
    u8 dtype code, u64 sequence count S, u64 document count D, int32[S] sequence lengths,
    int64[S] byte pointers, int64[D] document indices (boundaries into the sequences,
    starting at 0), optional int8[S] modes. A document is the sequences between two boundaries.
    """
    idx = Path(str(prefix) + ".idx")
    if not idx.is_file():
        raise LengthsError(f"Megatron index not found: {idx}")
    data = idx.read_bytes()
    if len(data) < 34 or data[:9] != _IDX_HEADER:
        raise LengthsError(f"{idx}: not a Megatron .idx file (bad magic header)")
    (version,) = struct.unpack_from("<Q", data, 9)
    if version != 1:
        raise LengthsError(f"{idx}: unsupported .idx version {version} (expected 1)")
    seq_count, doc_count = struct.unpack_from("<QQ", data, 18)
    need = 34 + 4 * seq_count + 8 * seq_count + 8 * doc_count
    if len(data) < need:
        raise LengthsError(
            f"{idx}: truncated: {len(data)} bytes, the header announces {seq_count} sequences and "
            f"{doc_count} document boundaries ({need} bytes)"
        )
    seq_lens = np.frombuffer(data, dtype=np.int32, count=seq_count, offset=34).astype(np.int64)
    doc_idx = np.frombuffer(data, dtype=np.int64, count=doc_count, offset=34 + 12 * seq_count)
    if doc_count == 0 or doc_idx[0] != 0 or doc_idx[-1] != seq_count or np.any(np.diff(doc_idx) < 0):
        raise LengthsError(f"{idx}: malformed document index (must rise from 0 to the sequence count {seq_count})")
    csum = np.concatenate([[0], np.cumsum(seq_lens)])
    return csum[doc_idx[1:]] - csum[doc_idx[:-1]]


def _check(values: np.ndarray, where: str) -> np.ndarray:
    if values.ndim != 1:
        raise LengthsError(f"{where}: expected a 1-D array of lengths, got shape {values.shape}")
    if values.size == 0:
        raise LengthsError(f"{where}: no lengths")
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise LengthsError(f"{where}: length #{bad[0]} = {float(values[bad[0]])} is not an integer")
    elif values.dtype.kind not in "iu":
        raise LengthsError(f"{where}: lengths must be integers, got dtype {values.dtype}")
    out = values.astype(np.int64)
    bad = np.flatnonzero(out < 1)
    if bad.size:
        raise LengthsError(f"{where}: length #{bad[0]} = {out[bad[0]]} (lengths must be >= 1; {bad.size} such)")
    return out


def read_lengths(spec: str | Path) -> np.ndarray:
    """Lengths L (int64, >= 1) from a text file, a .npy file, or a Megatron dataset prefix."""
    p = Path(spec)
    s = str(spec)
    for ext in (".idx", ".bin"):
        if s.endswith(ext) and Path(s[: -len(ext)] + ".idx").is_file():
            s, p = s[: -len(ext)], Path(s[: -len(ext)])
            break
    if Path(s + ".idx").is_file() and not p.is_file():
        sizes = read_megatron_document_sizes(s)
        lengths = sizes[sizes >= 2] - 1
        if lengths.size == 0:
            raise LengthsError(f"{s}.idx: no document has at least 2 tokens")
        return lengths
    if not p.exists():
        raise LengthsError(f"lengths file not found: {p} (nor a Megatron dataset prefix {p}.idx)")
    if p.is_dir():
        raise LengthsError(f"{p} is a directory; give a text file, a .npy file or a Megatron dataset prefix")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:  # numpy raises several kinds for a bad file
            raise LengthsError(f"{p}: cannot read as .npy: {e}") from None
        return _check(np.asarray(arr), str(p))
    values = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        try:
            v = int(t)
        except ValueError:
            raise LengthsError(f"{p}:{lineno}: {t!r} is not an integer length") from None
        if v < 1:
            raise LengthsError(f"{p}:{lineno}: length {v} (lengths must be >= 1)")
        values.append(v)
    if not values:
        raise LengthsError(f"{p}: no lengths")
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class OverlongReport:
    """What :func:`apply_max_len` did."""

    truncated: int = 0
    dropped: int = 0


def apply_max_len(
    lengths: np.ndarray, max_len: int | None, mode: str = "truncate"
) -> tuple[np.ndarray, OverlongReport]:
    """Enforce the largest planned length: truncate to ``max_len``, drop, or raise (naming the first one)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if mode not in OVERLONG_MODES:
        raise LengthsError(f"overlong mode must be one of {OVERLONG_MODES}, got {mode!r}")
    if max_len is None:
        return lengths, OverlongReport()
    if max_len < 1:
        raise LengthsError(f"max length must be >= 1, got {max_len}")
    over = np.flatnonzero(lengths > max_len)
    if over.size == 0:
        return lengths, OverlongReport()
    if mode == "error":
        raise LengthsError(
            f"{over.size} sequence(s) longer than the max length {max_len}: first is #{over[0]} with "
            f"{lengths[over[0]]} tokens (use --overlong truncate or drop)"
        )
    if mode == "truncate":
        return np.minimum(lengths, max_len), OverlongReport(truncated=int(over.size))
    kept = lengths[lengths <= max_len]
    if kept.size == 0:
        raise LengthsError(f"all {lengths.size} sequences are longer than the max length {max_len}")
    return kept, OverlongReport(dropped=int(over.size))
