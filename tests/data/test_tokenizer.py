import importlib.util

import numpy as np
import pytest

from megatron.flexsp.data.tokenizer import (
    BYTE_EOD,
    BYTE_PAD,
    ByteTokenizer,
    HuggingFaceTokenizer,
    build_tokenizer,
    token_dtype,
)

TEXTS = ["", "hello world", "héllo ✓ 日本語 🙂", "tabs\tand\nnewlines\r\n", "\x00\x7f"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))  # independent reference: the UTF-8 bytes
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids) == text
    assert tok.detokenize(ids + [tok.eod, tok.pad]) == text  # specials are not text


def test_byte_specials_and_vocab():
    tok = ByteTokenizer()
    assert (tok.eod, tok.pad, tok.vocab_size) == (BYTE_EOD, BYTE_PAD, 258)
    assert tok.eod not in tok.tokenize("".join(chr(c) for c in range(256)))
    assert token_dtype(tok.vocab_size) == np.uint16
    assert token_dtype(70000) == np.int32


def test_build_tokenizer_errors():
    assert isinstance(build_tokenizer("ByteTokenizer"), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'GPT2BPE'"):
        build_tokenizer("GPT2BPE")
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers installed")
def test_hf_without_transformers_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="pip install transformers"):
        HuggingFaceTokenizer(str(tmp_path))


def test_hf_local_tokenizer_round_trip(hf_tokenizer_dir, tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert tok.tokenize("hello world hello") == [2, 3, 2]
    assert tok.tokenize("hello zebra") == [2, 0]
    assert tok.eod == 1 and tok.vocab_size == 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HuggingFaceTokenizer(str(tmp_path / "missing"))
