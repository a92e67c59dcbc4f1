"""The tiny GPT the runtime tests build: 2 layers, 4 heads in 2 query groups (GQA), hidden 32, FFN 48.

Why shared: the executor, model, sharding and parallel-state tests each need a model small enough
for CPU and gloo, with grouped-query attention so that a degree-4 group replicates kv heads; one
definition keeps them building the same shape. Each test passes what it varies (vocabulary,
positions, seed, extra megatron fields).
"""

from __future__ import annotations

from typing import Any

# megatron's full activation recomputation (its CheckpointFunction re-runs the layer, all-to-all
# included, during backward), as GPTConfig.extra
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def tiny_gpt_config(pos: str = "rope", *, vocab_size: int, max_position_embeddings: int = 32, seed: int, **more: Any):
    """GPTConfig of the tiny model with ``pos`` position embeddings; ``more`` are further GPTConfig fields."""
    from megatron.flexsp.runtime.model import GPTConfig

    return GPTConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        position_embedding_type=pos,
        seed=seed,
        **more,
    )
