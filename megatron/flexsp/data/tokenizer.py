"""Tokenizers for preprocessing and the embedded corpus.

The byte-level tokenizer needs no download, so the quickstart and CI work offline:
ids 0..255 are the UTF-8 bytes of the text, 256 is EOD (end of document), 257 is PAD.
``ByteTokenizer.vocab_size == 258``; a model may pad its embedding table beyond that.

HuggingFace tokenizers are loaded from a local directory only (``transformers`` is an
optional dependency; a clear error says how to install it when it is missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

BYTE_VOCAB = 256
BYTE_EOD = 256
BYTE_PAD = 257
BYTE_VOCAB_SIZE = 258

TOKENIZER_TYPES = ("ByteTokenizer", "HuggingFaceTokenizer")


class Tokenizer(Protocol):
    """What preprocessing needs from a tokenizer."""

    vocab_size: int

    @property
    def eod(self) -> int | None: ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; EOD and PAD are the two ids after the bytes."""

    vocab_size = BYTE_VOCAB_SIZE

    @property
    def eod(self) -> int:
        return BYTE_EOD

    @property
    def pad(self) -> int:
        return BYTE_PAD

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_bytes(self, data: bytes) -> list[int]:
        """Raw bytes (e.g. a source file read in binary) without a decode/encode round trip."""
        return list(data)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Special ids are dropped; invalid UTF-8 (a truncated document) is replaced, not raised."""
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258, eod=256, pad=257)"


class HuggingFaceTokenizer:
    """A ``transformers`` tokenizer read from a local path (never downloads)."""

    def __init__(self, model_path: str) -> None:
        try:
            from transformers import AutoTokenizer  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError(
                "--tokenizer-type HuggingFaceTokenizer needs the optional package 'transformers' "
                "(pip install transformers); or use --tokenizer-type ByteTokenizer, which needs nothing"
            ) from exc
        import os

        if not os.path.exists(model_path):
            raise FileNotFoundError(
                f"--tokenizer-model {model_path!r} does not exist (a local tokenizer directory is required)"
            )
        self.model_path = model_path
        self._tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.vocab_size = len(self._tok)

    @property
    def eod(self) -> int | None:
        return self._tok.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None) -> Tokenizer:
    """Megatron-style ``--tokenizer-type`` / ``--tokenizer-model`` to a tokenizer object."""
    if tokenizer_type in ("ByteTokenizer", "byte"):
        return ByteTokenizer()
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH (a local directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}")


def token_dtype(vocab_size: int):
    """Smallest numpy dtype for the .bin file (Megatron's rule: uint16 below 65500 ids)."""
    import numpy as np

    if vocab_size is None or vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size!r}")
    return np.uint16 if vocab_size < 65500 else np.int32
