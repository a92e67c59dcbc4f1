"""flexsp-convert refuses what it cannot represent: one line naming the field, exit code 2, nothing
written (no output directory, no temporary directory left beside it).

Each case edits a real directory written by transformers' save_pretrained (tiny Llama / Qwen2).
The checks run before any process group or model exists, so they run in this process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.convert import hf_models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfbad")
    llama = hf_models.build("llama")
    return {
        "llama": hf_models.save(llama, root / "llama"),
        "qwen2": hf_models.save(hf_models.build("qwen2"), root / "qwen2"),
        # small shards: model.safetensors.index.json + several files
        "sharded": hf_models.save(llama, root / "sharded", max_shard_size="20KB"),
    }


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _case(saved, tmp_path, name: str):
    """A copy of a saved model, broken as ``name`` says; (hf dir, extra CLI args, expected text)."""
    base = "qwen2" if name.startswith("qwen2") else "sharded" if name == "missing_shard" else "llama"
    d = tmp_path / "in"
    shutil.copytree(saved[base], d)
    extra: list[str] = []
    if name == "missing_shard":
        shard = sorted(d.glob("model-*.safetensors"))[1]
        shard.unlink()
        return d, extra, f"names shard {shard.name}, which is missing"
    if name == "wrong_shape":
        _edit_config(d, intermediate_size=44)
        return d, extra, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [48, 32], config.json implies [44, 32]"
    if name == "unsupported_field":
        _edit_config(d, logit_softcapping=30.0)
        return d, extra, "unsupported field 'logit_softcapping'"
    if name == "moe":
        _edit_config(d, num_local_experts=8)
        return d, extra, "num_local_experts=8: mixture-of-experts"
    if name == "rope_type":
        _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
        return d, extra, "rope_parameters.rope_type='yarn' is not supported"
    if name == "rope_llama3_constant":
        params = dict(json.loads((d / "config.json").read_text())["rope_parameters"], low_freq_factor=2.0)
        _edit_config(d, rope_parameters=params)
        return d, extra, "rope_parameters.low_freq_factor=2.0 is not supported"
    if name == "sliding_window":
        _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)
        return d, extra, "sliding_window=8 is below max_position_embeddings"
    if name == "qwen2_sliding_window":
        _edit_config(d, use_sliding_window=True, sliding_window=16)
        return d, extra, "use_sliding_window=true"
    if name == "vocab_over_table":
        return (
            d,
            ["--vocab-size", "40", "--make-vocab-size-divisible-by", "8"],
            "vocab_size=96 is larger than the padded",
        )
    if name == "architecture":
        _edit_config(d, architectures=["GemmaForCausalLM"], model_type="gemma")
        return d, extra, "architectures 'GemmaForCausalLM' is not supported"
    if name == "attention_bias":
        _edit_config(d, attention_bias=True)
        return d, extra, "attention_bias=true is not supported"
    if name == "head_dim":
        _edit_config(d, head_dim=16)
        return d, extra, "head_dim=16 differs from hidden_size/num_attention_heads=8"
    if name == "no_transformer_engine":
        if importlib.util.find_spec("transformer_engine") is not None:
            pytest.skip("Transformer Engine is installed here: the TE spec can be built")
        return d, ["--transformer-impl", "transformer_engine"], "needs Transformer Engine installed"
    if name == "no_weights":
        (d / "model.safetensors").unlink()
        return d, extra, "no model.safetensors and no model.safetensors.index.json"
    raise AssertionError(name)


CASES = [
    "missing_shard",
    "wrong_shape",
    "unsupported_field",
    "moe",
    "rope_type",
    "rope_llama3_constant",
    "sliding_window",
    "qwen2_sliding_window",
    "vocab_over_table",
    "architecture",
    "attention_bias",
    "head_dim",
    "no_transformer_engine",
    "no_weights",
]


def _run(argv: list[str]) -> tuple[int, str, str]:
    from megatron.flexsp.convert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", CASES)
def test_bad_hf_directory_is_one_line_exit_2_nothing_written(saved, tmp_path, name):
    hf_dir, extra, expected = _case(saved, tmp_path, name)
    dest = tmp_path / "out" / "ckpt"
    rc, out, err = _run(["hf-to-flexsp", "--hf", str(hf_dir), "--out", str(dest), *extra])
    assert rc == 2, (name, out, err)
    assert err.count("\n") == 1 and expected in err, (name, err)
    assert not dest.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_and_bad_checkpoint_are_refused(saved, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    rc, _, err = _run(["hf-to-flexsp", "--hf", str(saved["llama"]), "--out", str(busy)])
    assert rc == 2 and "already exists and is not empty" in err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    rc, _, err = _run(["flexsp-to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf_out")])
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "hf_out").exists()


def test_python_m_entry_point_exits_2_with_one_line(saved, tmp_path):
    """The module entry point (what the flexsp-convert console script runs) in a fresh interpreter."""
    hf_dir, _, expected = _case(saved, tmp_path, "missing_shard")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron.flexsp.convert",
            "hf-to-flexsp",
            "--hf",
            str(hf_dir),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and expected in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()
