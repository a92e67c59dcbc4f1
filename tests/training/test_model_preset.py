"""Trainer flags of real checkpoints (issue 18): --model-preset, tied/untied output, norm epsilon, QKV bias,
RoPE scaling, Megatron's vocabulary padding; bad values stop with exit code 2 before any work.

References: the published config.json values and parameter counts of each model (written out here,
not read from the code under test), and brute force for the padding.
"""

from __future__ import annotations

import pytest

from megatron.flexsp.data.tokenizer import BYTE_VOCAB_SIZE
from megatron.flexsp.training import arguments as A
from megatron.flexsp.training.configs import configs_from_args
from megatron.flexsp.training.distributed import LaunchEnv
from megatron.flexsp.training.loop import main

ENV = LaunchEnv(0, 2, 0, 2, "127.0.0.1", 1)
# a preset's shape made tiny so the CPU can hold it; everything else comes from the preset
SMALL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2"]
SMALL += ["--group-query-attention", "--ffn-hidden-size", "128", "--seq-length", "256", "--mock-data"]

# config.json of each checkpoint on the Hugging Face Hub: (num_hidden_layers, hidden_size, intermediate_size,
# num_attention_heads, num_key_value_heads, vocab_size, max_position_embeddings, rms_norm_eps, rope_theta,
# llama3 rope_scaling factor or None, QKV bias, tie_word_embeddings)
PUBLISHED = {
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256, 8192, 1e-5, 500000, None, False, False),
    "llama3.1-8b": (32, 4096, 14336, 32, 8, 128256, 131072, 1e-5, 500000, 8.0, False, False),
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 152064, 131072, 1e-6, 1000000, None, True, False),
    "mistral-7b": (32, 4096, 14336, 32, 8, 32768, 32768, 1e-5, 1000000, None, False, False),
}
# published parameter counts (model cards); Qwen2.5-7B's includes its 129,024 QKV biases, which the
# cost model's prior leaves out
PUBLISHED_PARAMS = {
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512 - 28 * (3584 + 2 * 512),
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_sets_the_published_architecture(name):
    a = A.parse_args(["--model-preset", name])
    layers, h, ffn, heads, groups, vocab, max_pos, eps, theta, scaling, qkv_bias, tied = PUBLISHED[name]
    assert (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.num_attention_heads) == (layers, h, ffn, heads)
    assert (a.num_query_groups, a.group_query_attention, a.vocab_size) == (groups, True, vocab)
    assert (a.max_position_embeddings, a.norm_epsilon, a.rotary_base) == (max_pos, eps, theta)
    assert a.use_rope_scaling == (scaling is not None)
    if scaling is not None:
        assert a.rope_scaling_factor == scaling
    assert (a.add_qkv_bias, a.untie_embeddings_and_output_weights) == (qkv_bias, not tied)
    assert (a.swiglu, a.normalization, a.position_embedding_type) == (True, "RMSNorm", "rope")
    # the padded table is the published one: every preset's vocabulary is already a multiple of 128
    assert A.padded_vocab_size(vocab, a.make_vocab_size_divisible_by) == vocab


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_preset_has_a_cost_model_of_its_shape(name):
    from megatron.flexsp.planner.presets import load_cost_model

    cm = load_cost_model(name, 64)
    layers, h, _, heads, groups = PUBLISHED[name][:5]
    assert (cm.num_layers, cm.hidden_size, cm.num_attention_heads, cm.num_query_groups) == (layers, h, heads, groups)
    d = cm.to_dict()
    assert d["prior"]["num_parameters"] == PUBLISHED_PARAMS[name]
    assert cm.memory.model_states_mb == pytest.approx(16 * PUBLISHED_PARAMS[name] / 64 / 2**20)
    # every SP degree the planner may pick splits the heads evenly (Qwen's 28 heads: 2 and 4)
    degrees = sorted(cm.alltoall.bandwidth_gbs)
    assert degrees and all(heads % d == 0 for d in degrees)
    assert degrees == ([2, 4] if heads == 28 else [2, 4, 8, 16, 32])


def test_explicit_flags_override_the_preset():
    a = A.parse_args(["--model-preset", "qwen2.5-7b", *SMALL, "--norm-epsilon", "1e-5", "--vocab-size", "1000"])
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_query_groups) == (2, 64, 4, 2)
    assert (a.norm_epsilon, a.vocab_size, a.seq_length) == (1e-5, 1000, 256)
    assert (a.add_qkv_bias, a.rotary_base, a.untie_embeddings_and_output_weights) == (True, 1000000, True)
    # flag order does not matter: the preset never wins over a flag given before it
    b = A.parse_args(["--num-layers", "3", "--model-preset", "llama3-8b"])
    assert (b.num_layers, b.hidden_size) == (3, 4096)


def test_flags_reach_gpt_config_and_transformer_config():
    from megatron.flexsp.runtime.model import to_transformer_config

    argv = ["--model-preset", "llama3.1-8b", *SMALL, "--vocab-size", "1000", "--rope-scaling-factor", "4"]
    c = configs_from_args(A.parse_args(argv), ENV)
    m = c.model
    assert (m.norm_epsilon, m.use_rope_scaling, m.rope_scaling_factor, m.rotary_base) == (1e-5, True, 4.0, 500000)
    assert not m.share_embeddings_and_output_weights and not m.add_qkv_bias and not m.add_bias_linear
    assert (m.vocab_size, c.data.vocab_size) == (1024, 1000)  # padded table, the data's ids stay below 1000
    argv = [*SMALL, "--norm-epsilon", "1e-6", "--add-qkv-bias", "--disable-bias-linear"]
    m = configs_from_args(A.parse_args(argv), ENV).model
    assert (m.norm_epsilon, m.add_qkv_bias, m.add_bias_linear) == (1e-6, True, False)
    assert m.share_embeddings_and_output_weights  # Megatron's default: tied
    t = to_transformer_config(m)
    assert (t.layernorm_epsilon, t.add_qkv_bias, t.add_bias_linear) == (1e-6, True, False)
    assert configs_from_args(A.parse_args(SMALL), ENV).model.norm_epsilon == 1e-5


def _brute_force_pad(v: int, d: int) -> int:
    n = v
    while n % d:
        n += 1
    return n


def test_vocab_padding_is_megatrons():
    for v in (1, 127, 128, 129, 258, 1000, 32000, 151665):
        for d in (1, 8, 64, 128, 1000):
            assert A.padded_vocab_size(v, d) == _brute_force_pad(v, d), (v, d)
    # the byte tokenizer's 258 ids: a table of 384 rows by default, 258 with --make-vocab-size-divisible-by 1
    assert configs_from_args(A.parse_args(SMALL), ENV).model.vocab_size == 384
    c = configs_from_args(A.parse_args([*SMALL, "--make-vocab-size-divisible-by", "1"]), ENV)
    assert (c.model.vocab_size, c.data.vocab_size) == (BYTE_VOCAB_SIZE, BYTE_VOCAB_SIZE)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--norm-epsilon", "0"], "argument --norm-epsilon: must be a finite number > 0"),
        (["--rope-scaling-factor", "-2"], "argument --rope-scaling-factor: must be a finite number > 0"),
        (["--make-vocab-size-divisible-by", "0"], "argument --make-vocab-size-divisible-by: must be a positive"),
        (["--model-preset", "llama9"], "argument --model-preset: invalid choice: 'llama9'"),
    ],
)
def test_bad_values_stop_argparse_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err


def test_rope_scaling_without_rope_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["--use-rope-scaling", "--position-embedding-type", "learned_absolute", "--mock-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--use-rope-scaling needs --position-embedding-type rope" in err[0], err


def test_resume_mismatch_names_the_flag():
    """A checkpoint written untied (or with another table size) names the flag that makes it fit."""
    from pathlib import Path

    from megatron.flexsp.training.checkpoint_loader import _check

    untied = {"embedding.word_embeddings.weight": [258, 16], "output_layer.weight": [258, 16]}
    tied_padded = {"embedding.word_embeddings.weight": [384, 16]}
    meta = {"format_version": 2, "world_size": 1, "model_signature": untied}
    msg = _check(meta, tied_padded, Path("ck"))
    assert "add --untie-embeddings-and-output-weights" in msg
    msg = _check(
        meta, {**untied, "embedding.word_embeddings.weight": [384, 16], "output_layer.weight": [384, 16]}, Path("ck")
    )
    assert "--make-vocab-size-divisible-by" in msg and "258 rows vs 384" in msg
    meta["model_signature"] = tied_padded
    assert "tied, drop it" in _check(meta, untied, Path("ck"))
    assert _check(meta, tied_padded, Path("ck")) is None


def test_megatron_comparison_writes_the_preset_out():
    """scripts/megatron_flags.py: Megatron-LM has no presets, so the vanilla command gets the flags the preset sets
    (explicit flags still win), with the same names for the new architecture flags."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import megatron_flags

    flexsp = ["--model-preset", "qwen2.5-7b", "--num-layers", "2", "--seq-length", "4096", "--mock-data"]
    m = megatron_flags.translate(flexsp, world_size=8, cp=4)["megatron"]

    def value(flag):
        return m[m.index(flag) + 1]

    assert (value("--num-layers"), value("--hidden-size"), value("--num-query-groups")) == ("2", "3584", "4")
    assert (value("--norm-epsilon"), value("--rotary-base"), value("--vocab-size")) == ("1e-06", "1000000", "152064")
    assert "--add-qkv-bias" in m and "--untie-embeddings-and-output-weights" in m and "--use-rope-scaling" not in m
    assert "--model-preset" not in m
    plain = megatron_flags.translate(["--mock-data", "--seq-length", "1024"], world_size=4, cp=2)["megatron"]
    assert "--untie-embeddings-and-output-weights" not in plain and "--disable-bias-linear" in plain
