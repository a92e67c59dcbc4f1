"""Tiny Hugging Face models built here (nothing downloaded), the independent reference of tests/convert.

Why every parameter is redrawn: transformers initialises biases to zero and norms to one, which
would let a mapping that drops a bias or swaps two norms pass; random values everywhere make
every tensor's place matter.
"""

from __future__ import annotations

from pathlib import Path

import torch

# GQA (4 query heads in 2 kv groups), untied output, Llama 3.1 RoPE scaling, vocabulary 96 padded to 128.
LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)
# q/k/v biases, tied embeddings, eps 1e-6, vocabulary 128 (no padding).
QWEN2 = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)

# Multi-query attention (one kv head for 4 query heads), no sliding window (Mistral v0.3), untied.
MISTRAL = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    sliding_window=None,
    tie_word_embeddings=False,
)


def build(kind: str, seed: int = 0, **overrides):
    """A LlamaForCausalLM ('llama'), Qwen2ForCausalLM ('qwen2') or MistralForCausalLM ('mistral') with random weights, fp32, eval mode;
    ``overrides`` replace config fields."""
    import transformers

    cls, conf, fields = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, LLAMA),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, QWEN2),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, MISTRAL),
    }[kind]
    torch.manual_seed(seed)
    model = cls(conf(**{**fields, **overrides})).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def save(model, path: Path, **kw) -> Path:
    model.save_pretrained(str(path), **kw)
    return path


def documents(vocab: int, lengths: list[int], seed: int = 7) -> list[torch.Tensor]:
    """Documents of L + 1 token ids each (the runtime's convention: input doc[:-1], labels doc[1:])."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n + 1,), generator=g) for n in lengths]


@torch.no_grad()
def hf_logits(model, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    """transformers' logits of each document alone (positions 0..L-1), [L, vocab] each."""
    return [model(d[None, :-1]).logits[0].float() for d in docs]
