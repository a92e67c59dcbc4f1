"""Shared helpers for the data tests: tiny .bin/.idx files written straight from token lists."""

import numpy as np
import pytest


@pytest.fixture
def write_prefix(tmp_path):
    """write_prefix(name, docs, dtype=np.uint16, multi=None) -> prefix.

    ``multi`` optionally maps a document number to a list of sequence lengths, so that
    document is stored as several sequences (Megatron's sentence-split layout).
    """

    def _write(name, docs, dtype=np.uint16, multi=None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        prefix = str(tmp_path / name)
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for d, doc in enumerate(docs):
            arr = np.asarray(doc, dtype=dtype)
            lengths = (multi or {}).get(d, [arr.size])
            assert sum(lengths) == arr.size
            b.add_document(arr, lengths)
        b.finalize(prefix + ".idx")
        return prefix

    return _write


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    """A tiny word-level HuggingFace tokenizer saved locally (skips without transformers/tokenizers)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    path = tmp_path / "hf_tok"
    fast.save_pretrained(str(path))
    return str(path)
