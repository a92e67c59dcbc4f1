"""``build_datasets(config) -> (train, valid)``: the trainer's one call into the data layer.

Sources (exactly one): ``data_path`` (Megatron .bin/.idx prefixes, optionally weighted),
``mock`` (synthetic long-tail documents) or ``stdlib_corpus`` (the embedded real corpus).
Each source is split into train/valid/test by contiguous document ranges like Megatron's
``--split 969,30,1`` (split before the length filter, so changing --seq-length never moves
a document between splits), then filtered by the length rule, then blended by weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron.flexsp.data.blend import BLEND_UNITS, BlendedDocuments, parse_data_path
from megatron.flexsp.data.documents import DocumentDataset, IndexedDocuments, check_overlong
from megatron.flexsp.data.mock import MockConfig, MockDocuments
from megatron.flexsp.data.tokenizer import BYTE_VOCAB_SIZE

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class DataConfig:
    """Data settings (Megatron flag names in comments)."""

    seq_length: int  # --seq-length: the largest L kept
    data_path: list[str] = field(default_factory=list)  # --data-path [w1] p1 [w2] p2 ...
    split: str = "969,30,1"  # --split
    overlong: str = "truncate"  # --overlong {truncate,drop}
    mock: bool = False  # --mock-data
    mock_config: MockConfig = field(default_factory=MockConfig)
    stdlib_corpus: bool = False  # the embedded real corpus
    # "toplevel" (default): one document per top-level def/class, a real long tail at CPU-sized
    # seq-lengths (p50 ~470, p90 ~3.5K bytes); "file": whole files (p50 ~7.8K, mostly truncated)
    stdlib_granularity: str = "toplevel"
    stdlib_max_files: int | None = None  # first N files in sorted order (tests, quick demos)
    vocab_size: int = BYTE_VOCAB_SIZE  # token range of mock documents
    seed: int = 1234  # --seed
    cache_dir: str | None = None  # stdlib corpus cache (default ~/.cache/flexsp)
    blend_by: str = "documents"  # "documents" | "tokens": what blend weights count
    blend_size: int | None = None  # documents in a weighted blend (default: sum of components)

    @classmethod
    def from_args(cls, args, vocab_size: int | None = None) -> DataConfig:
        """From a Megatron-style namespace (--data-path --split --seq-length --mock-data --seed ...).

        Missing attributes take the defaults; with neither --data-path nor --mock-data the
        stdlib corpus is used (the quickstart default).
        """
        g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        mock = MockConfig(
            num_documents=g("mock_data_num_docs", MockConfig.num_documents),
            max_len=g("mock_data_max_len"),
            median=g("mock_data_median"),
            sigma=g("mock_data_sigma"),
            tail_frac=g("mock_data_tail_frac"),
            pareto_alpha=g("mock_data_pareto_alpha"),
            tail_min=g("mock_data_tail_min"),
            min_len=g("mock_data_min_len"),
        )
        data_path = list(g("data_path") or [])
        is_mock = bool(g("mock_data", False))
        return cls(
            seq_length=int(args.seq_length),
            data_path=data_path,
            split=g("split") or "969,30,1",
            overlong=g("overlong") or "truncate",
            mock=is_mock,
            mock_config=mock,
            stdlib_corpus=bool(g("stdlib_corpus", not is_mock and not data_path)),
            stdlib_granularity=g("stdlib_granularity") or "toplevel",
            stdlib_max_files=g("stdlib_max_docs", g("stdlib_max_files")),
            vocab_size=int(vocab_size or g("vocab_size") or BYTE_VOCAB_SIZE),
            seed=int(g("seed", 1234)),
            cache_dir=g("data_cache_dir", g("cache_dir")),
            blend_by=g("blend_by") or "documents",
            blend_size=g("blend_size"),
        )

    def validate(self) -> None:
        if int(self.seq_length) < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        check_overlong(self.overlong)
        sources = [
            n
            for n, on in (
                ("--data-path", bool(self.data_path)),
                ("--mock-data", self.mock),
                ("stdlib corpus", self.stdlib_corpus),
            )
            if on
        ]
        if len(sources) != 1:
            raise ValueError(
                f"choose exactly one data source (--data-path, --mock-data or the stdlib corpus); got {sources or 'none'}"
            )
        if self.blend_by not in BLEND_UNITS:
            raise ValueError(f"blend_by must be one of {BLEND_UNITS}, got {self.blend_by!r}")
        parse_split(self.split)


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``/``-separated; fewer than 3 parts pad with 0) -> normalized weights."""
    text = str(split).strip()
    parts = [p.strip() for p in text.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad --split {split!r}: expected up to 3 comma-separated numbers like 969,30,1") from None
    if not 1 <= len(values) <= 3:
        raise ValueError(f"bad --split {split!r}: expected 1 to 3 numbers, got {len(values)}")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"bad --split {split!r}: numbers must be finite, >= 0, with a positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) document ranges of train, valid, test (Megatron's rounding)."""
    fractions = parse_split(split)
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    shift = bounds[-1] - num_documents
    bounds = [0] + [max(0, b - shift) for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _document_count(prefix: str) -> int:
    from megatron.flexsp.data import indexed

    return int(len(indexed.open_indexed(prefix).document_indices) - 1)


def build_split_datasets(config) -> dict[str, DocumentDataset | None]:
    """All three splits; a split with weight 0 (or no documents left) is None.

    ``config`` is a DataConfig or a Megatron-style namespace (see DataConfig.from_args).
    """
    if not isinstance(config, DataConfig):
        config = DataConfig.from_args(config)
    config.validate()
    if config.mock:
        n = config.mock_config.num_documents
        return {
            name: MockDocuments(
                config.seq_length,
                config.vocab_size,
                config.seed,
                config.mock_config,
                config.overlong,
                name=f"mock:{name}",
                doc_range=(start, stop),
            )
            if stop > start
            else None
            for name, (start, stop) in zip(SPLIT_NAMES, split_ranges(config.split, n))
        }

    weights: list[float] | None
    if config.stdlib_corpus:
        from megatron.flexsp.data.stdlib_corpus import build_stdlib_corpus

        corpus = build_stdlib_corpus(
            config.cache_dir, granularity=config.stdlib_granularity, max_files=config.stdlib_max_files
        )
        weights, prefixes = None, [corpus.prefix]
    else:
        weights, prefixes = parse_data_path(config.data_path)
        from megatron.flexsp.data import indexed

        for p in prefixes:
            indexed.check_prefix(p)

    parts: dict[str, list[tuple[DocumentDataset, float]]] = {n: [] for n in SPLIT_NAMES}
    for j, prefix in enumerate(prefixes):
        for name, (start, stop) in zip(SPLIT_NAMES, split_ranges(config.split, _document_count(prefix))):
            if stop <= start:
                continue
            ds = IndexedDocuments(prefix, config.seq_length, config.overlong, (start, stop))
            w = weights[j] if weights is not None else float(len(ds))  # unweighted: each document once
            if len(ds) == 0:
                if name == "train" and (weights is None or w > 0):
                    raise ValueError(
                        f"{prefix}: no training documents left after the length filter "
                        f"(seq_length {config.seq_length}, overlong {config.overlong!r}): {ds.stats.to_dict()}"
                    )
                continue
            if w > 0:
                parts[name].append((ds, w))

    out: dict[str, DocumentDataset | None] = {}
    for k, name in enumerate(SPLIT_NAMES):
        comps = parts[name]
        size = config.blend_size if name == "train" else None
        if not comps:
            out[name] = None
        elif len(comps) == 1 and size is None:
            out[name] = comps[0][0]
        else:
            out[name] = BlendedDocuments(
                [c[0] for c in comps],
                [c[1] for c in comps],
                size=size,
                seed=config.seed + k,
                by=config.blend_by,
                name=name,
            )
    return out


def build_datasets(config) -> tuple[DocumentDataset, DocumentDataset | None]:
    """(train, valid) document datasets; valid is None when the split gives it no documents."""
    if not isinstance(config, DataConfig):
        config = DataConfig.from_args(config)
    splits = build_split_datasets(config)
    if splits["train"] is None or len(splits["train"]) == 0:
        raise ValueError(
            f"no training documents (split {config.split!r}, seq_length {config.seq_length}, overlong {config.overlong!r})"
        )
    return splits["train"], splits["valid"]
