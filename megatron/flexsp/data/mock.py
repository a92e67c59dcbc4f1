"""Mock documents: long-tailed lengths and deterministic random tokens, no files needed.

Lengths come from ``megatron.flexsp.data.synthetic.longtail_lengths`` (log-normal body plus a
Pareto tail, the shape of real long-context corpora). Document i's tokens depend only on
(seed, i), so every rank and every resumed run sees the same data in any access order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron.flexsp.data.documents import DocumentDataset, select_documents


@dataclass
class MockConfig:
    """Length distribution of mock documents; None means synthetic.longtail_lengths' default."""

    num_documents: int = 100_000
    max_len: int | None = None  # longest generated L; default: seq_length (nothing overlong)
    median: float | None = None
    sigma: float | None = None
    tail_frac: float | None = None
    pareto_alpha: float | None = None
    tail_min: float | None = None
    min_len: int | None = None

    def distribution_kwargs(self) -> dict:
        names = ("median", "sigma", "tail_frac", "pareto_alpha", "tail_min", "min_len")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class MockDocuments(DocumentDataset):
    """Synthetic documents; raw document j has ``l_j + 1`` tokens for a drawn l_j.

    ``doc_range`` keeps raw documents [start, stop) only (train/valid split).
    """

    def __init__(
        self,
        seq_length: int,
        vocab_size: int,
        seed: int,
        config: MockConfig | None = None,
        overlong: str = "truncate",
        name: str = "mock",
        doc_range: tuple[int, int] | None = None,
    ) -> None:
        from megatron.flexsp.data.synthetic import longtail_lengths

        config = config or MockConfig()
        if config.num_documents < 1:
            raise ValueError(f"mock num_documents must be >= 1, got {config.num_documents}")
        if vocab_size < 1:
            raise ValueError(f"mock vocab_size must be >= 1, got {vocab_size}")
        self.name = name
        self.config = config
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        max_len = config.max_len if config.max_len is not None else seq_length
        raw = np.asarray(
            longtail_lengths(
                config.num_documents, max_len=int(max_len), seed=self.seed, **config.distribution_kwargs()
            ),
            dtype=np.int64,
        )
        start, stop = doc_range if doc_range is not None else (0, raw.size)
        if not 0 <= start <= stop <= raw.size:
            raise ValueError(f"mock: document range [{start}, {stop}) outside [0, {raw.size})")
        self.doc_range = (int(start), int(stop))
        self.seq_length = int(seq_length)
        positions, self.lengths, self.stats = select_documents(raw[start:stop] + 1, seq_length, overlong)
        self.doc_ids = positions + start  # raw document number: its tokens depend only on (seed, it)

    def _read(self, i: int) -> np.ndarray:
        j = int(self.doc_ids[i])
        rng = np.random.default_rng([self.seed, j])
        return rng.integers(0, self.vocab_size, size=int(self.lengths[i]) + 1, dtype=np.int64)
