"""The pure pieces of flexsp-convert: config.json of real model shapes -> trainer flags, the per-group
QKV layout written out by hand, and both layer specs' norm names (Transformer Engine fuses them)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron.flexsp.convert.errors import ConvertError
from megatron.flexsp.convert.hf_config import HFModel, model_from_hf_config, pad_vocab_size
from megatron.flexsp.convert.hf_weights import expected_hf_shapes, hf_to_megatron, megatron_to_hf


def _saved_config(kind: str, **fields) -> dict:
    """config.json as transformers' save_pretrained writes it for these fields."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    cfg = json.loads(cls[kind](**fields).to_json_string())
    cfg["architectures"] = [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[kind]
    ]
    return cfg


# Published shapes (config.json of meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B, mistralai/Mistral-7B-v0.3).
LLAMA31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
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
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    sliding_window=131072,
    use_sliding_window=False,
    max_window_layers=28,
    tie_word_embeddings=False,
)
MISTRAL_7B_V03 = dict(
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    sliding_window=None,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(
    "kind,fields,expect",
    [
        (
            "llama",
            LLAMA31_8B,
            "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
            "--group-query-attention --num-query-groups 8 --position-embedding-type rope --normalization RMSNorm "
            "--swiglu --disable-bias-linear --rotary-base 500000 --use-rope-scaling --rope-scaling-factor 8.0 "
            "--norm-epsilon 1e-05 --max-position-embeddings 131072 --vocab-size 128256 "
            "--make-vocab-size-divisible-by 128 --untie-embeddings-and-output-weights",
        ),
        (
            "qwen2",
            QWEN25_7B,
            "--num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944 --num-attention-heads 28 "
            "--group-query-attention --num-query-groups 4 --position-embedding-type rope --normalization RMSNorm "
            "--swiglu --disable-bias-linear --add-qkv-bias --rotary-base 1000000 --norm-epsilon 1e-06 "
            "--max-position-embeddings 131072 --vocab-size 152064 --make-vocab-size-divisible-by 128 "
            "--untie-embeddings-and-output-weights",
        ),
        (
            "mistral",
            MISTRAL_7B_V03,
            "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
            "--group-query-attention --num-query-groups 8 --position-embedding-type rope --normalization RMSNorm "
            "--swiglu --disable-bias-linear --rotary-base 1000000 --norm-epsilon 1e-05 "
            "--max-position-embeddings 32768 --vocab-size 32768 --make-vocab-size-divisible-by 128 "
            "--untie-embeddings-and-output-weights",
        ),
    ],
)
def test_published_shapes_give_megatron_flags(kind, fields, expect):
    m = model_from_hf_config(_saved_config(kind, **fields))
    assert " ".join(m.trainer_flags(make_vocab_size_divisible_by=128)) == expect
    # And back: the exported config.json describes the same model.
    again = model_from_hf_config(m.to_hf_config())
    assert again == HFModel(**{**m.__dict__, "dtype": again.dtype})


def test_vocab_padding_is_megatrons():
    assert [pad_vocab_size(v, 128) for v in (96, 128, 129, 152064, 151937)] == [128, 128, 256, 152064, 152064]
    assert pad_vocab_size(50257, 1) == 50257


def _tiny(**kw) -> HFModel:
    base = dict(
        architecture="Qwen2ForCausalLM",
        num_layers=2,
        hidden_size=8,
        ffn_hidden_size=6,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=2,
        vocab_size=10,
        max_position_embeddings=64,
        norm_epsilon=1e-6,
        rotary_base=10000,
        tied=False,
        qkv_bias=True,
    )
    return HFModel(**{**base, **kw})


def test_qkv_is_fused_per_query_group():
    """Rows labelled by head: kv group 0 = q heads 0, 1 then k0 then v0; group 1 = q2, q3, k1, v1
    (megatron's get_query_key_value_tensors splits [.., G, (H/G + 2) * d] into [H/G * d, d, d])."""
    m = _tiny()
    hf = {n: torch.zeros(s) for n, s in expected_hf_shapes(m).items()}
    d = m.head_dim
    label = lambda base, heads: torch.arange(heads).repeat_interleave(d).float() + base  # noqa: E731
    p = "model.layers.0.self_attn."
    hf[p + "q_proj.weight"] = label(0, 4)[:, None].expand(-1, 8).clone()
    hf[p + "k_proj.weight"] = label(100, 2)[:, None].expand(-1, 8).clone()
    hf[p + "v_proj.weight"] = label(200, 2)[:, None].expand(-1, 8).clone()
    hf[p + "q_proj.bias"], hf[p + "k_proj.bias"], hf[p + "v_proj.bias"] = label(0, 4), label(100, 2), label(200, 2)
    out = hf_to_megatron(hf, m, padded_vocab_size=16)
    rows = out["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist()
    heads = [0, 1, 100, 200, 2, 3, 101, 201]
    assert rows == [float(h) for h in heads for _ in range(d)]
    assert out["decoder.layers.0.self_attention.linear_qkv.bias"].tolist() == rows


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_both_layer_specs_round_trip(impl):
    m = _tiny(tied=impl == "local")
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in expected_hf_shapes(m).items()}
    mg = hf_to_megatron(hf, m, padded_vocab_size=16, transformer_impl=impl)
    names = set(mg)
    if impl == "transformer_engine":
        assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in names
        assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in names
        assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    else:
        assert {"decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight"} <= names
    assert ("output_layer.weight" in names) == (not m.tied)
    assert mg["embedding.word_embeddings.weight"].shape == (16, 8)
    assert torch.all(mg["embedding.word_embeddings.weight"][10:] == 0)
    fc1 = mg["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:6], hf["model.layers.0.mlp.gate_proj.weight"])  # [gate; up]
    back = megatron_to_hf(mg, m)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_bad_tables_are_named():
    m = _tiny()
    hf = {n: torch.zeros(s) for n, s in expected_hf_shapes(m).items()}
    with pytest.raises(ConvertError, match="more than the padded vocabulary table"):
        hf_to_megatron(hf, m, padded_vocab_size=8)
    with pytest.raises(ConvertError, match="no tensor 'decoder.layers.1.mlp.linear_fc2.weight'"):
        mg = hf_to_megatron(hf, m, padded_vocab_size=16)
        del mg["decoder.layers.1.mlp.linear_fc2.weight"]
        megatron_to_hf(mg, m)


_ARCH_FIELDS = (
    "num_layers hidden_size num_attention_heads num_query_groups ffn_hidden_size kv_channels vocab_size "
    "max_position_embeddings position_embedding_type normalization swiglu add_bias_linear rotary_base "
    "share_embeddings_and_output_weights norm_epsilon add_qkv_bias use_rope_scaling rope_scaling_factor "
    "attention_dropout"
).split()


@pytest.mark.parametrize("kind,fields", [("llama", LLAMA31_8B), ("qwen2", QWEN25_7B), ("mistral", MISTRAL_7B_V03)])
def test_printed_flags_make_the_trainer_build_the_converted_model(kind, fields):
    """Contract C1 end to end: the trainer's own parser and config builder, fed the printed flags,
    give the GPTConfig the checkpoint was written for (so --load CKPT --finetune finds its shapes)."""
    from megatron.flexsp.training import arguments as A
    from megatron.flexsp.training.configs import model_config_from_args

    m = model_from_hf_config(_saved_config(kind, **fields))
    flags = m.trainer_flags(make_vocab_size_divisible_by=128)
    want = m.gpt_config(padded_vocab_size=pad_vocab_size(m.vocab_size, 128))
    got = model_config_from_args(A.parse_args([*flags, "--seq-length", "4096"]), cuda=False)
    for name in _ARCH_FIELDS:
        assert getattr(got, name) == getattr(want, name), (name, getattr(got, name), getattr(want, name))


# config.json files as published (transformers 4.x style: rope_theta / rope_scaling at the top level).
PUBLISHED_LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
PUBLISHED_QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


@pytest.mark.parametrize(
    "published,fields", [(PUBLISHED_LLAMA31_8B, ("llama", LLAMA31_8B)), (PUBLISHED_QWEN25_7B, ("qwen2", QWEN25_7B))]
)
def test_transformers_4_and_5_config_styles_read_the_same(published, fields):
    old_style = model_from_hf_config(published)
    new_style = model_from_hf_config(_saved_config(*fields[:1], **fields[1]))
    assert old_style == HFModel(**{**new_style.__dict__, "dtype": "bfloat16"})


def test_export_finds_the_architecture_in_the_checkpoint_it_was_fine_tuned_from(tmp_path):
    from megatron.flexsp.convert.hf import inherited_arg

    converted, tuned = tmp_path / "converted", tmp_path / "tuned"
    converted.mkdir()
    (converted / "meta.json").write_text(json.dumps({"args": {"hf_architecture": "MistralForCausalLM"}}))
    assert inherited_arg({"load": str(converted)}, "hf_architecture") == "MistralForCausalLM"
    tuned.mkdir()
    (tuned / "meta.json").write_text(json.dumps({"args": {"load": str(converted)}}))
    assert inherited_arg({"load": str(tuned)}, "hf_architecture") == "MistralForCausalLM"  # two hops
    assert inherited_arg({"hf_architecture": "Qwen2ForCausalLM", "load": str(converted)}, "hf_architecture") == (
        "Qwen2ForCausalLM"
    )
    assert inherited_arg({"load": str(tmp_path / "gone")}, "hf_architecture") is None
    assert inherited_arg({}, "hf_architecture") is None
