"""An embedded real corpus for the quickstart: the Python standard library's source files.

Every machine with Python has it, it needs no download, and its document lengths are
naturally long-tailed (a few huge modules, many small ones). Files are read in sorted
relative-path order, tokenized with the byte-level tokenizer (+ EOD), and written once as
a Megatron .bin/.idx pair in a cache directory; later runs reuse it. The cache name carries
a content fingerprint, so a different Python (different stdlib) builds its own copy, and
ranks can compare fingerprints to be sure they train on the same data.

granularity="toplevel" (default): one document per top-level block (module header, each
top-level def/class with its decorators); granularity="file": one document per file. On
CPython 3.11 (732 files, 12.1M bytes) files have p50 7.8K / p90 36K bytes, so at the
seq-lengths a CPU run affords most files would be truncated to the same length; top-level
blocks (6.6K documents) have p50 ~480 / p90 ~3.6K / p99 ~21K: a real long tail at any
seq-length from 1K up.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import asdict, dataclass

import numpy as np

from megatron.flexsp.data import indexed
from megatron.flexsp.data.indexed import _unique
from megatron.flexsp.data.tokenizer import BYTE_EOD, BYTE_VOCAB_SIZE, token_dtype

FORMAT_VERSION = 1
GRANULARITIES = ("file", "toplevel")
# Not part of every installation, or machine-specific: left out so the corpus is the same
# wherever the same Python version runs.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
EXCLUDED_DIR_PREFIXES = ("config-",)
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata_",)


@dataclass
class StdlibCorpus:
    """Where the corpus lives and what it holds."""

    prefix: str  # .bin/.idx prefix, for IndexedDocuments
    root: str
    granularity: str
    num_files: int
    num_documents: int
    num_tokens: int  # including one EOD per document
    fingerprint: str
    vocab_size: int = BYTE_VOCAB_SIZE

    def to_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> str:
    env = os.environ.get("FLEXSP_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flexsp")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_source_files(root: str, max_files: int | None = None) -> list[str]:
    """Sorted relative paths (posix) of the .py files under ``root``, exclusions applied."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"stdlib corpus root {root!r} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_DIR_PREFIXES)]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(EXCLUDED_FILE_PREFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    found.sort()
    if max_files is not None:
        found = found[: int(max_files)]
    if not found:
        raise FileNotFoundError(f"no .py files under stdlib corpus root {root!r}")
    return found


_BLOCK_STARTS = (b"def ", b"async def ", b"class ")


def split_toplevel(source: bytes) -> list[bytes]:
    """Split a module at its top-level defs/classes (a decorator block starts its def).

    The pieces concatenate back to ``source`` exactly.
    """
    lines = source.splitlines(keepends=True)
    pieces: list[bytes] = []
    current: list[bytes] = []
    prev_decorator = False
    for line in lines:
        is_decorator = line.startswith(b"@")
        starts = (is_decorator and not prev_decorator) or (line.startswith(_BLOCK_STARTS) and not prev_decorator)
        if starts and current:
            pieces.append(b"".join(current))
            current = []
        current.append(line)
        prev_decorator = is_decorator
    if current:
        pieces.append(b"".join(current))
    return pieces


def _documents(root: str, files: list[str], granularity: str) -> list[bytes]:
    docs = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        docs.extend(split_toplevel(data) if granularity == "toplevel" else [data])
    return docs


def build_stdlib_corpus(
    cache_dir: str | None = None,
    *,
    root: str | None = None,
    granularity: str = "toplevel",
    max_files: int | None = None,
    rebuild: bool = False,
    verbose: bool = False,
) -> StdlibCorpus:
    """Build (or reuse from the cache) the stdlib corpus and describe it."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"stdlib corpus granularity must be one of {GRANULARITIES}, got {granularity!r}")
    root = os.path.abspath(root or stdlib_root())
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    files = list_source_files(root, max_files)
    docs = _documents(root, files, granularity)

    h = hashlib.sha1(f"flexsp-stdlib-v{FORMAT_VERSION}:{granularity}".encode())
    for rel in files:
        h.update(rel.encode() + b"\0")
    for doc in docs:
        h.update(len(doc).to_bytes(8, "little"))
        h.update(doc)
    fingerprint = h.hexdigest()[:16]
    prefix = os.path.join(cache_dir, f"stdlib_{granularity}_{fingerprint}")
    info_path = prefix + ".json"

    os.makedirs(cache_dir, exist_ok=True)
    with _FileLock(prefix + ".lock"):  # several ranks on one machine build it once
        if rebuild or not (os.path.isfile(info_path) and _complete(prefix)):
            if verbose:
                print(f"[flexsp] building stdlib corpus from {root} ({len(files)} files) -> {prefix}", flush=True)
            n_docs, n_tokens = indexed.write_documents(
                prefix,
                (np.append(np.frombuffer(d, dtype=np.uint8).astype(np.int64), BYTE_EOD) for d in docs),
                token_dtype(BYTE_VOCAB_SIZE),
            )
            corpus = StdlibCorpus(prefix, root, granularity, len(files), n_docs, n_tokens, fingerprint)
            tmp = f"{info_path}.tmp{_unique()}"
            with open(tmp, "w") as f:
                json.dump({**corpus.to_dict(), "files": files}, f, indent=1)
            os.replace(tmp, info_path)
    with open(info_path) as f:
        info = json.load(f)
    info.pop("files", None)
    info["prefix"] = prefix  # the cache may have been moved since it was built
    return StdlibCorpus(**info)


def _complete(prefix: str) -> bool:
    return os.path.isfile(indexed.idx_path(prefix)) and os.path.isfile(indexed.bin_path(prefix))


class _FileLock:
    """Exclusive advisory lock (fcntl); a no-op where fcntl is unavailable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            return self
        self._f = open(self.path, "a")
        fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            import fcntl

            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def main(argv=None) -> None:
    """Build the corpus and print its size and length percentiles."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--granularity", choices=GRANULARITIES, default="toplevel")
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--rebuild", action="store_true")
    a = p.parse_args(argv)
    c = build_stdlib_corpus(
        a.cache_dir, granularity=a.granularity, max_files=a.max_files, rebuild=a.rebuild, verbose=True
    )
    counts = indexed.document_token_counts(indexed.open_indexed(c.prefix))
    pct = np.percentile(counts, [50, 90, 99, 100]).astype(int)
    print(json.dumps(c.to_dict(), indent=1))
    print(f"document tokens: p50={pct[0]} p90={pct[1]} p99={pct[2]} max={pct[3]} mean={counts.mean():.0f}")


if __name__ == "__main__":
    main()
