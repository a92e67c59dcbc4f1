"""Weighted blends of document datasets, Megatron ``--data-path 0.3 A 0.7 B`` style.

The blend is a virtual dataset of ``size`` documents. Position j takes the next document of
the component whose share is furthest behind its weight (Megatron's greedy rule, so after
any prefix of n positions component d holds within one document of w_d * n). The k-th
document drawn from component d is ``perm_e[k % len(d)]`` with a fresh seeded permutation
per pass e, so small components repeat (upsampling) without bias and large ones are
subsampled. Weights are in documents by default, or in tokens (``by="tokens"``: component d
contributes close to w_d of the tokens, which is what fixed-window Megatron blends mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from megatron.flexsp.data.documents import DocumentDataset, DocumentStats

BLEND_UNITS = ("documents", "tokens")


def parse_data_path(data_path: Sequence[str]) -> tuple[list[float] | None, list[str]]:
    """``[w1, p1, w2, p2, ...]`` -> (weights, prefixes); ``[p1, p2, ...]`` -> (None, prefixes)."""
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty")

    def as_weight(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if as_weight(items[0]) is None:
        numeric = [s for s in items if as_weight(s) is not None]
        if numeric:
            raise ValueError(
                f"bad --data-path {items}: mixes prefixes and weights {numeric} (a mix of weighted and "
                "unweighted entries); give either only prefixes or 'weight prefix' pairs"
            )
        return None, items
    if len(items) % 2:
        raise ValueError(
            f"bad --data-path {items}: weights and prefixes must come in pairs "
            "(W1 PREFIX1 W2 PREFIX2 ...), got an odd number of items"
        )
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        wf = as_weight(w)
        if wf is None:
            raise ValueError(f"bad --data-path {items}: expected a weight, got {w!r}")
        if as_weight(p) is not None:
            raise ValueError(f"bad --data-path {items}: expected a prefix after weight {w}, got the number {p!r}")
        if not math.isfinite(wf) or wf < 0:
            raise ValueError(f"bad --data-path {items}: weight {w} of {p!r} must be finite and >= 0")
        weights.append(wf)
        prefixes.append(p)
    if sum(weights) <= 0:
        raise ValueError(f"bad --data-path {items}: weights sum to 0")
    return weights, prefixes


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"bad blend weights {list(weights)}: need finite, >= 0, positive sum")
    return w / w.sum()


class _DrawCosts:
    """Token cost of the k-th draw from one component, one pass (permutation) cached at a time."""

    def __init__(self, tokens: np.ndarray, pass_order) -> None:
        self.tokens, self.pass_order, self.n = tokens, pass_order, len(tokens)
        self._pass, self._costs = -1, None

    def __getitem__(self, k: int) -> float:
        e = k // self.n
        if e != self._pass:
            self._pass, self._costs = e, self.tokens[self.pass_order(e)].tolist()
        return self._costs[k % self.n]


def greedy_assignment(weights: np.ndarray, size: int, costs=None) -> tuple[np.ndarray, np.ndarray]:
    """Component per blend position and the running draw count within that component.

    ``costs`` (per component, ``costs[d][k]`` = units of the k-th draw from d) switches the
    balance from document counts to token counts.
    """
    n = len(weights)
    which = np.empty(size, dtype=np.int32)
    draw = np.empty(size, dtype=np.int64)
    counts = [0] * n
    got = [0.0] * n  # documents or tokens taken from each component
    total = 0.0
    w = [float(x) for x in weights]
    active = [d for d in range(n) if w[d] > 0]
    for j in range(size):
        # the component furthest behind its target share after taking one more unit
        best, best_err = active[0], -math.inf
        for d in active:
            err = w[d] * (total + 1.0) - got[d]
            if err > best_err:
                best, best_err = d, err
        which[j] = best
        draw[j] = counts[best]
        unit = 1.0 if costs is None else float(costs[best][counts[best]])
        counts[best] += 1
        got[best] += unit
        total += unit
    return which, draw


class BlendedDocuments(DocumentDataset):
    """``size`` documents drawn from ``datasets`` in proportion to ``weights``."""

    def __init__(
        self,
        datasets: Sequence[DocumentDataset],
        weights: Sequence[float],
        size: int | None = None,
        seed: int = 0,
        by: str = "documents",
        name: str = "blend",
    ) -> None:
        if by not in BLEND_UNITS:
            raise ValueError(f"blend unit must be one of {BLEND_UNITS}, got {by!r}")
        if len(datasets) != len(weights):
            raise ValueError(f"blend: {len(datasets)} datasets but {len(weights)} weights")
        w = normalize_weights(weights)
        for d, ds in enumerate(datasets):
            if w[d] > 0 and len(ds) == 0:
                raise ValueError(f"blend: component {ds.name!r} has weight {weights[d]} but no documents left")
        self.datasets = list(datasets)
        self.weights = w
        self.name = name
        self.seed = int(seed)
        self.size = int(size) if size is not None else int(sum(len(ds) for d, ds in enumerate(datasets) if w[d] > 0))
        if self.size < 0:
            raise ValueError(f"blend size must be >= 0, got {size}")
        costs = None
        if by == "tokens":  # tokens of the k-th draw from d, in the same order the blend reads them
            costs = [_DrawCosts(self.datasets[d].lengths + 1, self._pass_order(d)) for d in range(len(datasets))]
        self.component, draws = greedy_assignment(w, self.size, costs)
        self.sample = np.empty(self.size, dtype=np.int64)
        for d in range(len(datasets)):
            rows = np.flatnonzero(self.component == d)
            if rows.size:
                n = len(self.datasets[d])
                passes = draws[rows] // n  # nondecreasing along rows: each pass is one contiguous run
                bounds = np.flatnonzero(np.diff(passes)) + 1
                for run in np.split(np.arange(rows.size), bounds):  # one permutation per pass: memory O(size)
                    sel = rows[run]
                    self.sample[sel] = self._pass_order(d)(int(passes[run[0]]))[draws[sel] % n]
        self.lengths = np.empty(self.size, dtype=np.int64)
        for d in range(len(datasets)):
            mask = self.component == d
            self.lengths[mask] = self.datasets[d].lengths[self.sample[mask]]
        self.stats = sum((ds.stats for ds in self.datasets), DocumentStats())

    def _pass_order(self, d: int):
        """pass e -> the order in which component d's documents are drawn in that pass."""
        n, seed = len(self.datasets[d]), self.seed
        return lambda e: np.random.default_rng([seed, d, e]).permutation(n).astype(np.int64)

    def _read(self, i: int) -> np.ndarray:
        return self.datasets[int(self.component[i])][int(self.sample[i])]

    def component_counts(self) -> np.ndarray:
        return np.bincount(self.component, minlength=len(self.datasets))
