"""Hugging Face ``config.json`` <-> the model FlexSP trains (GPTConfig and the trainer's flags).

Why a whitelist: a field this module does not understand may change what the weights compute
(a sliding window, experts, another RoPE type, quantization). Converting anyway would give a
checkpoint that trains but is not the model the user downloaded. So every field is either mapped,
checked to hold the one value FlexSP represents, known not to change the forward pass (token ids,
generation defaults), or refused with a ConvertError that names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConvertError

__all__ = [
    "ARCHITECTURES",
    "HFModel",
    "LLAMA3_ROPE",
    "model_from_hf_config",
    "pad_vocab_size",
]

# architecture -> model_type; the three share one decoder layout (Qwen2 adds q/k/v biases).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}

# megatron's RotaryEmbedding applies Llama 3 scaling with these constants fixed (only the factor is a
# parameter), so a config with other values cannot be represented.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Fields that do not change the forward pass: token ids, generation defaults, bookkeeping of
# transformers' PretrainedConfig.
_INERT = frozenset(
    """architectures model_type transformers_version torch_dtype dtype initializer_range use_cache
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id return_dict
    output_hidden_states output_attentions torchscript use_bfloat16 tokenizer_class prefix
    task_specific_params problem_type id2label label2id is_encoder_decoder is_decoder add_cross_attention
    tie_encoder_decoder chunk_size_feed_forward pruned_heads finetuning_task cross_attention_hidden_size
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens tf_legacy_loss""".split()
)
# Fields this module maps or checks (see model_from_hf_config).
_HANDLED = frozenset(
    """vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim hidden_act max_position_embeddings rms_norm_eps rope_theta rope_scaling rope_parameters
    tie_word_embeddings attention_bias mlp_bias attention_dropout pretraining_tp sliding_window
    use_sliding_window max_window_layers layer_types""".split()
)
_MOE = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "n_routed_experts")


def pad_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron's padded table: the vocabulary rounded up to a multiple of ``divisible_by`` (tp = 1)."""
    return -(-int(vocab_size) // int(divisible_by)) * int(divisible_by)


@dataclass
class HFModel:
    """The architecture both formats describe, field by field (one place for the mapping).

    ``vocab_size`` is the real (unpadded) vocabulary: Hugging Face's ``vocab_size`` and the
    trainer's ``--vocab-size``; FlexSP's tables have ``pad_vocab_size`` rows.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: int
    tied: bool
    qkv_bias: bool
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    attention_dropout: float = 0.0
    dtype: str | None = None

    def gpt_config(self, *, padded_vocab_size: int, transformer_impl: str = "local"):
        """The runtime's GPTConfig of this model (fp32 parameters, as the trainer keeps them)."""
        from megatron.flexsp.runtime.model import GPTConfig

        cfg = GPTConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=None if self.head_dim * self.num_attention_heads == self.hidden_size else self.head_dim,
            vocab_size=padded_vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            position_embedding_type="rope",
            normalization="RMSNorm",
            swiglu=True,
            transformer_impl=transformer_impl,
            add_bias_linear=False,
            attention_dropout=self.attention_dropout,
            rotary_base=self.rotary_base,
            share_embeddings_and_output_weights=self.tied,
            norm_epsilon=self.norm_epsilon,
            add_qkv_bias=self.qkv_bias,
            use_rope_scaling=self.use_rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
        )
        try:
            cfg.validate()
        except ValueError as e:
            raise ConvertError(f"the model cannot be built: {e}") from None
        return cfg

    def flag_values(self, *, make_vocab_size_divisible_by: int, transformer_impl: str = "local") -> list[tuple]:
        """(flag, value) pairs of ``pretrain_gpt_flexsp.py`` for this model; value True = a switch."""
        pairs: list[tuple[str, Any]] = [
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--ffn-hidden-size", self.ffn_hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
        ]
        if self.num_query_groups != self.num_attention_heads:
            pairs += [("--group-query-attention", True), ("--num-query-groups", self.num_query_groups)]
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConvertError(
                f"config.json: head_dim={self.head_dim} differs from hidden_size/num_attention_heads="
                f"{self.hidden_size / self.num_attention_heads:g}: the trainer has no --kv-channels flag"
            )
        pairs += [
            ("--position-embedding-type", "rope"),
            ("--normalization", "RMSNorm"),
            ("--swiglu", True),
            ("--disable-bias-linear", True),
        ]
        if self.qkv_bias:
            pairs.append(("--add-qkv-bias", True))
        pairs.append(("--rotary-base", self.rotary_base))
        if self.use_rope_scaling:
            pairs += [("--use-rope-scaling", True), ("--rope-scaling-factor", self.rope_scaling_factor)]
        pairs += [
            ("--norm-epsilon", self.norm_epsilon),
            ("--max-position-embeddings", self.max_position_embeddings),
            ("--vocab-size", self.vocab_size),
            ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
        ]
        if not self.tied:
            pairs.append(("--untie-embeddings-and-output-weights", True))
        if self.attention_dropout:
            pairs.append(("--attention-dropout", self.attention_dropout))
        if transformer_impl != "local":
            pairs.append(("--transformer-impl", transformer_impl))
        return pairs

    def trainer_flags(self, **kw: Any) -> list[str]:
        """The trainer's command-line flags of this model, in Megatron's names (contract C1)."""
        out: list[str] = []
        for flag, value in self.flag_values(**kw):
            out += [flag] if value is True else [flag, repr(value) if isinstance(value, float) else str(value)]
        return out

    def run_record(self, **kw: Any) -> dict[str, Any]:
        """The flags as the trainer records them in a checkpoint's meta.json (argparse dest names)."""
        rec = {flag[2:].replace("-", "_"): value for flag, value in self.flag_values(**kw)}
        rec.setdefault("untie_embeddings_and_output_weights", not self.tied)
        rec.setdefault("add_qkv_bias", self.qkv_bias)
        rec.setdefault("use_rope_scaling", self.use_rope_scaling)
        rec["num_query_groups"] = self.num_query_groups
        rec["kv_channels"] = self.head_dim
        rec["hf_architecture"] = self.architecture
        if self.dtype:
            rec["hf_dtype"] = self.dtype
        return rec

    def to_hf_config(self) -> dict[str, Any]:
        """config.json of this model, with the field names transformers 4.x and 5.x both read."""
        model_type = ARCHITECTURES[self.architecture]
        scaling = None
        if self.use_rope_scaling:
            scaling = {"rope_type": "llama3", "factor": float(self.rope_scaling_factor), **LLAMA3_ROPE}
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon,
            "rope_theta": float(self.rotary_base),
            "rope_scaling": scaling,
            "tie_word_embeddings": self.tied,
            "attention_dropout": self.attention_dropout,
            "torch_dtype": self.dtype or "float32",
        }
        if model_type == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None)
        elif model_type == "mistral":
            cfg.update(sliding_window=None)
        else:
            cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return cfg


def _int_field(hf: Mapping[str, Any], name: str, default: Any = None) -> int:
    v = hf.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"config.json: {name} must be a positive integer, got {v!r}")
    return v


def _check_fields(hf: Mapping[str, Any]) -> None:
    """Refuse experts and any field outside the whitelist, by name."""
    for name in _MOE:
        if hf.get(name):
            raise ConvertError(f"config.json: {name}={hf[name]!r}: mixture-of-experts models are not supported")
    unknown = sorted(k for k in hf if k not in _INERT and k not in _HANDLED and not k.startswith("_"))
    if unknown:
        raise ConvertError(
            f"config.json: unsupported field {unknown[0]!r} (={hf[unknown[0]]!r}); its effect on the model "
            f"cannot be represented" + (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
        )


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConvertError(f"config.json: architectures must name one of {sorted(ARCHITECTURES)}, got {archs!r}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConvertError(f"config.json: architectures {arch!r} is not supported (one of {sorted(ARCHITECTURES)})")
    mt = hf.get("model_type", ARCHITECTURES[arch])
    if mt != ARCHITECTURES[arch]:
        raise ConvertError(f"config.json: model_type {mt!r} does not match architectures {arch!r}")
    return arch


def _check_attention_kind(hf: Mapping[str, Any], model_type: str, max_pos: int) -> None:
    """Full causal attention only: refuse a sliding window in use, and biases megatron cannot place."""
    types = hf.get("layer_types")
    if types is not None and any(t != "full_attention" for t in types):
        bad = sorted({t for t in types if t != "full_attention"})
        raise ConvertError(f"config.json: layer_types has {bad}: only full attention is supported")
    window = hf.get("sliding_window")
    if model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise ConvertError(
                f"config.json: use_sliding_window=true (sliding_window={window}): sliding-window attention is not "
                "supported"
            )
    elif window is not None and window < max_pos:
        raise ConvertError(
            f"config.json: sliding_window={window} is below max_position_embeddings={max_pos}: sliding-window "
            "attention is in use and is not supported"
        )
    if model_type != "qwen2":
        for name in ("attention_bias", "mlp_bias"):
            if hf.get(name):
                raise ConvertError(
                    f"config.json: {name}=true is not supported (megatron's --add-qkv-bias puts biases on q, k, v only)"
                )
    if hf.get("pretraining_tp", 1) != 1:
        raise ConvertError(f"config.json: pretraining_tp={hf['pretraining_tp']!r} is not supported (must be 1)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"config.json: hidden_act={act!r} is not supported (SwiGLU needs 'silu')")


def _rope(hf: Mapping[str, Any]) -> tuple[int, bool, float]:
    """(rotary_base, use_rope_scaling, factor) from rope_theta / rope_scaling (transformers 4.x) or
    rope_parameters (5.x)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ConvertError(f"config.json: rope_parameters must be an object, got {params!r}")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0 or not math.isfinite(theta) or theta != int(theta):
        raise ConvertError(f"config.json: rope_theta={theta!r} must be a positive integer (megatron's --rotary-base)")
    scaling = hf.get("rope_scaling")
    where = "rope_scaling"
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling, where = params, "rope_parameters"
    if scaling is None:
        return int(theta), False, 8.0
    if not isinstance(scaling, Mapping):
        raise ConvertError(f"config.json: {where} must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return int(theta), False, 8.0
    if kind != "llama3":
        raise ConvertError(f"config.json: {where}.rope_type={kind!r} is not supported (only 'llama3' scaling)")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or not factor > 0:
        raise ConvertError(f"config.json: {where}.factor={factor!r} must be a number > 0")
    for name, want in LLAMA3_ROPE.items():
        got = scaling.get(name, want)
        if got != want:
            raise ConvertError(
                f"config.json: {where}.{name}={got!r} is not supported (megatron's llama3 RoPE scaling fixes it at "
                f"{want:g})"
            )
    return int(theta), True, float(factor)


def model_from_hf_config(hf: Mapping[str, Any]) -> HFModel:
    """The HFModel of a Llama / Qwen2 / Mistral config.json; ConvertError naming the first field
    that cannot be represented."""
    if not isinstance(hf, Mapping):
        raise ConvertError("config.json must hold a JSON object")
    arch = _architecture(hf)
    _check_fields(hf)
    model_type = ARCHITECTURES[arch]
    hidden = _int_field(hf, "hidden_size")
    heads = _int_field(hf, "num_attention_heads")
    groups = _int_field(hf, "num_key_value_heads", heads) if hf.get("num_key_value_heads") is not None else heads
    if heads % groups:
        raise ConvertError(f"config.json: num_key_value_heads={groups} must divide num_attention_heads={heads}")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConvertError(f"config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        head_dim = hidden // heads
    head_dim = _int_field({"head_dim": head_dim}, "head_dim")
    max_pos = _int_field(hf, "max_position_embeddings")
    _check_attention_kind(hf, model_type, max_pos)
    eps = hf.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ConvertError(f"config.json: rms_norm_eps={eps!r} must be a number > 0")
    dropout = hf.get("attention_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConvertError(f"config.json: attention_dropout={dropout!r} must be in [0, 1)")
    base, scaled, factor = _rope(hf)
    dtype = hf.get("torch_dtype", hf.get("dtype"))
    return HFModel(
        architecture=arch,
        num_layers=_int_field(hf, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_int_field(hf, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=_int_field(hf, "vocab_size"),
        max_position_embeddings=max_pos,
        norm_epsilon=float(eps),
        rotary_base=base,
        tied=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        use_rope_scaling=scaled,
        rope_scaling_factor=factor,
        attention_dropout=float(dropout),
        dtype=dtype if isinstance(dtype, str) else None,
    )
