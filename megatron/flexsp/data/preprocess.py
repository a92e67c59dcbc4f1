"""JSONL -> Megatron .bin/.idx, one document per JSON line (``scripts/preprocess_data.py``).

Flags follow Megatron's tools/preprocess_data.py: ``--input --output-prefix --json-keys
--tokenizer-type --tokenizer-model --append-eod --workers --log-interval``; the output of key
K is ``{output_prefix}_{K}_document.bin/.idx`` as in Megatron. Tokenizers: the built-in
``ByteTokenizer`` (no download) or a local ``HuggingFaceTokenizer`` directory. Every JSON
line becomes exactly one document, so document i is line i (blank lines are skipped).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from megatron.flexsp.data.indexed import DocumentWriter
from megatron.flexsp.data.tokenizer import TOKENIZER_TYPES, build_tokenizer, token_dtype

_worker_state: dict = {}


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _init_worker(tokenizer_type: str, tokenizer_model: str | None, keys: Sequence[str], append_eod: bool) -> None:
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _worker_state.update(tok=tok, keys=list(keys), append_eod=append_eod)


def _encode(item: tuple[str, int, str]) -> tuple[list[np.ndarray], int]:
    """(source, line number, line) -> one int64 token array per key, and the line's byte size."""
    source, lineno, line = item
    tok, keys, append_eod = _worker_state["tok"], _worker_state["keys"], _worker_state["append_eod"]
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}:{lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}:{lineno}: expected a JSON object, got {type(record).__name__}")
    out = []
    for key in keys:
        if key not in record:
            raise ValueError(f"{source}:{lineno}: no key {key!r} (keys: {sorted(record)}); set --json-keys")
        text = record[key]
        if not isinstance(text, str):
            raise ValueError(f"{source}:{lineno}: key {key!r} is {type(text).__name__}, expected a string")
        ids = tok.tokenize(text)
        if append_eod:
            ids = list(ids) + [tok.eod]
        out.append(np.asarray(ids, dtype=np.int64))
    return out, len(line)


def _lines(paths: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield path, lineno, line


def _bounded_imap(pool, items: Iterator, batch: int):
    """Ordered pool.imap over bounded slices (document i = line i) without reading the whole input.

    Pool.imap alone feeds its queue from the input as fast as it can, holding a large file in
    memory; slicing keeps at most ``batch`` lines in flight.
    """
    import itertools

    while True:
        chunk = list(itertools.islice(items, batch))
        if not chunk:
            return
        yield from pool.imap(_encode, chunk, chunksize=max(1, min(64, len(chunk) // (4 * pool._processes) or 1)))


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    *,
    json_keys: Sequence[str] = ("text",),
    tokenizer_type: str = "ByteTokenizer",
    tokenizer_model: str | None = None,
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 10000,
    quiet: bool = False,
) -> dict[str, dict]:
    """Tokenize ``inputs`` into one .bin/.idx per key; returns {key: {prefix, documents, tokens}}."""
    import os

    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path!r} does not exist")
    if not json_keys:
        raise ValueError("--json-keys is empty")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    tok = build_tokenizer(tokenizer_type, tokenizer_model)  # fail fast, in this process
    if append_eod and tok.eod is None:
        raise ValueError(f"--append-eod: tokenizer {tok!r} has no end-of-document (eos) token")
    dtype = token_dtype(tok.vocab_size)
    init = (tokenizer_type, tokenizer_model, list(json_keys), append_eod)
    writers = {k: DocumentWriter(output_prefix_for(output_prefix, k), dtype) for k in json_keys}
    start = time.time()
    n_docs = n_bytes = 0
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init)
            encoded = _bounded_imap(pool, _lines(inputs), batch=1024 * workers)
        else:
            _init_worker(*init)
            encoded = map(_encode, _lines(inputs))
        for arrays, size in encoded:
            for key, arr in zip(json_keys, arrays):
                writers[key].add(arr)
            n_docs += 1
            n_bytes += size
            if not quiet and log_interval > 0 and n_docs % log_interval == 0:
                dt = max(time.time() - start, 1e-9)
                print(
                    f"processed {n_docs} documents ({n_docs / dt:.0f} docs/s, {n_bytes / dt / 2**20:.2f} MB/s)",
                    file=sys.stderr,
                    flush=True,
                )
    except BaseException as exc:
        for w in writers.values():
            w.__exit__(type(exc), exc, None)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    result = {}
    for key, w in writers.items():
        w.__exit__(None, None, None)
        result[key] = {"prefix": w.prefix, "documents": w.documents, "tokens": w.tokens}
        if not quiet:
            print(
                f"wrote {w.prefix}.bin/.idx: {w.documents} documents, {w.tokens} tokens ({dtype.__name__})",
                file=sys.stderr,
            )
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenize JSONL into Megatron .bin/.idx, one document per line.")
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    p.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None, help="local HuggingFace tokenizer directory")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=10000, help="progress line every N documents")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        result = preprocess(
            a.input,
            a.output_prefix,
            json_keys=a.json_keys,
            tokenizer_type=a.tokenizer_type,
            tokenizer_model=a.tokenizer_model,
            append_eod=a.append_eod,
            workers=a.workers,
            log_interval=a.log_interval,
            quiet=a.quiet,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
