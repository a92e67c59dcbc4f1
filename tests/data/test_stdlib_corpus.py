import os

import numpy as np
import pytest

from megatron.flexsp.data import indexed
from megatron.flexsp.data.build import DataConfig, build_datasets
from megatron.flexsp.data.stdlib_corpus import build_stdlib_corpus, list_source_files, split_toplevel, stdlib_root
from megatron.flexsp.data.tokenizer import BYTE_EOD


def _all_docs(prefix):
    ds = indexed.open_indexed(prefix)
    return [indexed.read_document(ds, d) for d in range(len(ds.document_indices) - 1)]


def test_file_order_and_exclusions(tmp_path):
    for rel in [
        "b.py",
        "a.py",
        "pkg/z.py",
        "pkg/__init__.py",
        "site-packages/x.py",
        "test/t.py",
        "pkg/tests/t.py",
        "config-3.11-x/c.py",
        "_sysconfigdata__linux.py",
        "notes.txt",
    ]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# {rel}\n")
    assert list_source_files(str(tmp_path)) == ["a.py", "b.py", "pkg/__init__.py", "pkg/z.py"]
    assert list_source_files(str(tmp_path), max_files=2) == ["a.py", "b.py"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_source_files(str(tmp_path / "missing"))
    real = list_source_files(stdlib_root())
    assert "os.py" in real and not any("site-packages" in f or f.startswith("test/") for f in real)


def test_build_small_subset_equals_file_bytes_and_is_cached(tmp_path):
    root = os.path.join(stdlib_root(), "json")  # a small real piece of the stdlib
    files = list_source_files(root)
    corpus = build_stdlib_corpus(str(tmp_path), root=root, granularity="file")
    docs = _all_docs(corpus.prefix)
    expected = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            expected.append(list(f.read()) + [BYTE_EOD])
    assert [d.tolist() for d in docs] == expected
    assert (corpus.num_files, corpus.num_documents, corpus.num_tokens) == (
        len(files),
        len(files),
        sum(map(len, expected)),
    )
    mtime = os.stat(corpus.prefix + ".bin").st_mtime_ns
    again = build_stdlib_corpus(str(tmp_path), root=root, granularity="file")
    assert again == corpus and os.stat(corpus.prefix + ".bin").st_mtime_ns == mtime  # reused, not rebuilt
    top = build_stdlib_corpus(str(tmp_path), root=root)  # default: top-level blocks
    assert top.granularity == "toplevel" and top.prefix != corpus.prefix and top.num_documents > corpus.num_documents
    pieces = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            pieces += [list(p) + [BYTE_EOD] for p in split_toplevel(f.read())]
    assert [d.tolist() for d in _all_docs(top.prefix)] == pieces
    assert top.num_tokens - top.num_documents == corpus.num_tokens - corpus.num_documents  # same bytes
    with pytest.raises(ValueError, match="granularity"):
        build_stdlib_corpus(str(tmp_path), root=root, granularity="line")


def test_split_toplevel_pieces():
    src = b'"""doc"""\nimport os\n\n@a\n@b(1)\ndef f():\n    def g(): pass\n\nclass C:\n    x = 1\nasync def h():\n    pass\nX = 1\n'
    pieces = split_toplevel(src)
    assert b"".join(pieces) == src
    assert [p.split(b"\n")[0] for p in pieces] == [b'"""doc"""', b"@a", b"class C:", b"async def h():"]
    with open(os.path.join(stdlib_root(), "json", "decoder.py"), "rb") as f:
        data = f.read()
    assert b"".join(split_toplevel(data)) == data


def test_build_datasets_with_stdlib_corpus(tmp_path, monkeypatch):
    root = os.path.join(stdlib_root(), "email")
    import megatron.flexsp.data.stdlib_corpus as sc

    monkeypatch.setattr(sc, "stdlib_root", lambda: root)  # keep the test small
    train, valid = build_datasets(
        DataConfig(
            seq_length=256, stdlib_corpus=True, cache_dir=str(tmp_path), split="80,20,0", stdlib_granularity="file"
        )
    )
    assert len(train) > 0 and len(valid) > 0 and train.lengths.max() == 256
    assert train.stats.truncated > 0
    doc = train[0]
    files = list_source_files(root)
    with open(os.path.join(root, files[int(train.doc_ids[0])]), "rb") as f:
        assert doc.tolist() == list(f.read()[: len(doc)])
    assert np.all(train.lengths >= 1)
    top, _ = build_datasets(DataConfig(seq_length=256, stdlib_corpus=True, cache_dir=str(tmp_path), split="80,20,0"))
    assert len(top) > len(train) and np.mean(top.lengths) < np.mean(train.lengths)
