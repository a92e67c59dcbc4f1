"""Global-batch sampler over document indices: deterministic, resumable, plannable ahead.

Global batch k (counted from 0 over the whole run) is a pure function of (seed, k): epoch
``e = k // batches_per_epoch`` shuffles all documents with a generator seeded by
(seed, e) and batch k takes its slice; the last ``n % global_batch_size`` documents of each
shuffled epoch are left out (different ones every epoch). So the planner can ask for the
lengths of any upcoming batch without reading tokens, and resuming only needs the position.
Torch-free on purpose (the planner process uses it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def lengths_fingerprint(lengths: np.ndarray) -> str:
    """Short hash of the length array: a resumed run must see the same dataset."""
    return hashlib.sha1(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]


class GlobalBatchSampler:
    """Global batches of ``global_batch_size`` document indices into a dataset of ``dataset_lengths``."""

    def __init__(self, dataset_lengths, global_batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.lengths = np.asarray(dataset_lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise ValueError("dataset_lengths must be 1-D")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        n = int(self.lengths.shape[0])
        if n < global_batch_size:
            raise ValueError(
                f"dataset has {n} documents, fewer than one global batch of {global_batch_size}; "
                "lower --global-batch-size or use more data"
            )
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.batches_per_epoch = n // self.global_batch_size
        self.next_batch = 0  # position: the batch the next call to next() returns
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fingerprint = lengths_fingerprint(self.lengths)

    @property
    def num_documents(self) -> int:
        return int(self.lengths.shape[0])

    def epoch_of(self, k: int) -> int:
        return int(k) // self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_documents).astype(np.int64)
            else:
                perm = np.arange(self.num_documents, dtype=np.int64)
            self._perms[epoch] = perm
            while len(self._perms) > 2:  # planning ahead crosses at most one epoch boundary at a time
                self._perms.popitem(last=False)
        return perm

    def batch_indices(self, k: int) -> np.ndarray:
        """Document indices of global batch k (absolute, from 0)."""
        k = int(k)
        if k < 0:
            raise IndexError(f"global batch index must be >= 0, got {k}")
        epoch, b = divmod(k, self.batches_per_epoch)
        g = self.global_batch_size
        return self._epoch_order(epoch)[b * g : (b + 1) * g].copy()

    def batch_lengths(self, k: int) -> np.ndarray:
        """L of each document of global batch k, from the index only (no token reads)."""
        return self.lengths[self.batch_indices(k)]

    def upcoming_lengths(self, count: int) -> list[np.ndarray]:
        """Lengths of the next ``count`` batches from the current position (for plan-ahead)."""
        return [self.batch_lengths(self.next_batch + i) for i in range(count)]

    def next(self) -> tuple[int, np.ndarray]:
        """(k, indices) of the next batch, advancing the position."""
        k = self.next_batch
        idx = self.batch_indices(k)
        self.next_batch += 1
        return k, idx

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {
            "next_batch": self.next_batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_documents": self.num_documents,
            "shuffle": self.shuffle,
            "lengths_fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; refuse a state saved for a different dataset/batch/seed."""
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "num_documents", "shuffle", "lengths_fingerprint"):
            if key not in state:
                raise ValueError(f"sampler state lacks {key!r}: not a GlobalBatchSampler state")
            if state[key] != mine[key]:
                raise ValueError(
                    f"sampler state mismatch on {key}: checkpoint has {state[key]!r}, this run has {mine[key]!r} "
                    "(same data, split, seq-length, seed and global batch size are needed to resume)"
                )
        nb = int(state["next_batch"])
        if nb < 0:
            raise ValueError(f"sampler state next_batch must be >= 0, got {nb}")
        self.next_batch = nb


def read_batch(dataset, indices) -> list[np.ndarray]:
    """Token arrays (L_i + 1 ids each) of the given document indices, in order."""
    return [dataset[int(i)] for i in indices]
