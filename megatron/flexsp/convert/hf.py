"""``hf-to-flexsp`` and ``flexsp-to-hf``: whole conversions, every check before any write.

Why the import builds the model (on the meta device, no memory, no initialisation): the
checkpoint is written by ``training.checkpointing.save_checkpoint`` from a real GPTModel of the
converted config, so its names, shapes and extra states are exactly what ``--load CKPT
--finetune`` expects, and a mapping error shows up here as a named tensor rather than at load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hf_io
from .errors import ConvertError
from .hf_config import ARCHITECTURES, HFModel, model_from_hf_config, pad_vocab_size
from .hf_weights import expected_hf_shapes, hf_to_megatron, megatron_to_hf

__all__ = ["ImportResult", "export_hf", "import_hf", "inherited_arg", "model_from_checkpoint"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ImportResult:
    """What ``import_hf`` wrote: the model and the trainer flags that rebuild it."""

    model: HFModel
    flags: list[str]
    checkpoint: Path
    padded_vocab_size: int


@contextlib.contextmanager
def _one_process(seed: int = 1234) -> Iterator[None]:
    """torch.distributed and megatron's parallel_state on this one process (a world of 1 over an
    in-memory store, no port), as building a GPTModel and saving a checkpoint need; torn down after
    unless the caller had started them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from flexsp_patches import cpu_compat

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if dist.get_world_size() != 1:
            raise ConvertError(f"flexsp-convert runs on one process, not {dist.get_world_size()}")
        had_ps = ps.model_parallel_is_initialized()
        cpu_compat.init_model_parallel(seed=seed, device_type="cpu")
        try:
            yield
        finally:
            if not had_ps:
                ps.destroy_model_parallel()
    finally:
        if created:
            dist.destroy_process_group()


def _load_into_meta_model(gpt_cfg, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A GPTModel of ``gpt_cfg`` whose parameters are the tensors of ``state`` (names and shapes checked)."""
    from megatron.flexsp.runtime.model import build_gpt_model

    with torch.device("meta"):
        model = build_gpt_model(gpt_cfg, flexsp_attention=False)
    own = model.state_dict()
    for name, t in own.items():
        if name.endswith("_extra_state"):
            continue
        if name not in state:
            raise ConvertError(f"internal mapping error: GPTModel tensor {name!r} has no source")
        if tuple(state[name].shape) != tuple(t.shape):
            raise ConvertError(f"mapped tensor {name!r} has shape {list(state[name].shape)}, GPTModel {list(t.shape)}")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ConvertError(f"internal mapping error: GPTModel has no tensor {unexpected[0]!r}")
    model.load_state_dict(dict(state), strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ConvertError(f"internal mapping error: parameter {left[0]!r} was not loaded")
    return model


def _read_hf(hf_dir: Path, m: HFModel) -> dict[str, torch.Tensor]:
    """The checked fp32 tensors of a Hugging Face directory (a tied model may carry lm_head.weight
    as a copy of the embedding)."""
    files = hf_io.weight_files(hf_dir)
    expected = expected_hf_shapes(m)
    extra_head = m.tied and "lm_head.weight" in files
    if extra_head:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    hf_io.check_hf_tensors(files, expected)
    tensors = hf_io.read_hf_tensors(files, sorted(expected), dtype=torch.float32)
    if extra_head and not torch.equal(tensors.pop("lm_head.weight"), tensors["model.embed_tokens.weight"]):
        raise ConvertError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")
    return tensors


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    make_vocab_size_divisible_by: int = 128,
    vocab_size: int | None = None,
    transformer_impl: str = "local",
) -> ImportResult:
    """Convert a Hugging Face Llama / Qwen2 / Mistral directory into a FlexSP checkpoint at ``out``
    (model only, iteration 0, one process); ConvertError before anything is written."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} already exists and is not empty")
    if make_vocab_size_divisible_by < 1:
        raise ConvertError(f"--make-vocab-size-divisible-by must be >= 1, got {make_vocab_size_divisible_by}")
    if transformer_impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        raise ConvertError("--transformer-impl transformer_engine needs Transformer Engine installed (its layer spec)")
    m = model_from_hf_config(hf_io.read_hf_config(hf_dir))
    if vocab_size is not None:
        if vocab_size < 1:
            raise ConvertError(f"--vocab-size must be >= 1, got {vocab_size}")
        padded = pad_vocab_size(vocab_size, make_vocab_size_divisible_by)
        if m.vocab_size > padded:
            raise ConvertError(
                f"config.json: vocab_size={m.vocab_size} is larger than the padded table of --vocab-size "
                f"{vocab_size} ({padded} rows)"
            )
        m.vocab_size, hf_vocab = vocab_size, m.vocab_size
    else:
        padded, hf_vocab = pad_vocab_size(m.vocab_size, make_vocab_size_divisible_by), m.vocab_size
    kw: dict[str, Any] = dict(
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, transformer_impl=transformer_impl
    )
    flags = m.trainer_flags(**kw)  # refuses what the trainer has no flag for, before reading any tensor
    gpt_cfg = m.gpt_config(padded_vocab_size=padded, transformer_impl=transformer_impl)
    shape_model = HFModel(**{**m.__dict__, "vocab_size": hf_vocab})
    state = hf_to_megatron(
        _read_hf(hf_dir, shape_model),
        shape_model,
        padded_vocab_size=padded,
        transformer_impl=transformer_impl,
        consume=True,
    )
    record = m.run_record(**kw)
    record.update(padded_vocab_size=padded, hf_vocab_size=hf_vocab, converted_from=str(hf_dir.resolve()))
    from megatron.flexsp.training.checkpointing import save_checkpoint  # after every check: it loads megatron

    with _one_process(), hf_io.fresh_output(out, "--out") as tmp:
        model = _load_into_meta_model(gpt_cfg, state)
        save_checkpoint(tmp, 0, model, None, args=record)
    return ImportResult(model=m, flags=flags, checkpoint=out, padded_vocab_size=padded)


def _layer_count(state: Mapping[str, Any]) -> int:
    ids = {int(mt.group(1)) for k in state if (mt := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if not ids or ids != set(range(len(ids))):
        raise ConvertError(f"the checkpoint's decoder layers are not numbered 0..n-1 (found {sorted(ids)[:8]})")
    return len(ids)


def _check_representable(state: Mapping[str, torch.Tensor], args: Mapping[str, Any]) -> None:
    if args.get("position_embedding_type", "rope") != "rope" or "embedding.position_embeddings.weight" in state:
        raise ConvertError("the checkpoint uses learned absolute positions; Llama / Qwen2 / Mistral use RoPE")
    if args.get("normalization", "RMSNorm") != "RMSNorm":
        raise ConvertError(f"the checkpoint uses normalization {args['normalization']!r}; Hugging Face needs RMSNorm")
    biased = sorted(k for k in state if k.endswith(".bias") and "linear_qkv" not in k)
    if biased:
        raise ConvertError(f"the checkpoint has linear biases ({biased[0]}): not representable (--disable-bias-linear)")
    if any("q_layernorm" in k or "k_layernorm" in k for k in state):
        raise ConvertError("the checkpoint has q/k layer norms (--qk-layernorm): not representable")


def model_from_checkpoint(
    state: Mapping[str, torch.Tensor],
    args: Mapping[str, Any],
    *,
    architecture: str | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> HFModel:
    """The HFModel of a FlexSP model state: sizes from the tensors, the rest from the run's flags."""
    _check_representable(state, args)
    emb = state.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConvertError("the checkpoint has no embedding.word_embeddings.weight")
    rows, hidden = emb.shape
    layers = _layer_count(state)
    heads = args.get("num_attention_heads")
    if not isinstance(heads, int) or heads < 1:
        raise ConvertError("the checkpoint's args lack num_attention_heads (was it written by FlexSP?)")
    head_dim = int(args.get("kv_channels") or hidden // heads)
    qkv_rows = state["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0]
    groups, rest = divmod(qkv_rows // head_dim - heads, 2)
    if rest or groups < 1 or heads % groups or qkv_rows % head_dim:
        raise ConvertError(f"linear_qkv has {qkv_rows} rows: not (heads {heads} + 2 x groups) x head_dim {head_dim}")
    ffn = state["decoder.layers.0.mlp.linear_fc2.weight"].shape[1]
    if state["decoder.layers.0.mlp.linear_fc1.weight"].shape[0] != 2 * ffn:
        raise ConvertError("linear_fc1 is not [gate; up] of a SwiGLU MLP (--swiglu)")
    qkv_bias = "decoder.layers.0.self_attention.linear_qkv.bias" in state
    arch = (
        architecture
        or inherited_arg(args, "hf_architecture")
        or ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    )
    if arch not in ARCHITECTURES:
        raise ConvertError(f"--architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
    if (ARCHITECTURES[arch] == "qwen2") != qkv_bias:
        need = "has" if qkv_bias else "lacks"
        raise ConvertError(f"the checkpoint {need} q/k/v biases (--add-qkv-bias): architecture {arch} cannot hold it")
    vocab = int(vocab_size or args.get("vocab_size") or rows)
    if vocab > rows:
        raise ConvertError(f"vocabulary {vocab} is larger than the checkpoint's table ({rows} rows)")
    max_pos = args.get("max_position_embeddings") or args.get("seq_length")
    if not isinstance(max_pos, int) or max_pos < 1:
        raise ConvertError("the checkpoint's args lack max_position_embeddings and seq_length")
    if dtype not in _DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return HFModel(
        architecture=arch,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        norm_epsilon=float(args.get("norm_epsilon", 1e-5)),
        rotary_base=int(args.get("rotary_base", 10000)),
        tied="output_layer.weight" not in state,
        qkv_bias=qkv_bias,
        use_rope_scaling=bool(args.get("use_rope_scaling", False)),
        rope_scaling_factor=float(args.get("rope_scaling_factor", 8.0)),
        attention_dropout=float(args.get("attention_dropout", 0.0) or 0.0),
        dtype=dtype,
    )


def inherited_arg(args: Mapping[str, Any], key: str, hops: int = 4) -> Any:
    """``args[key]``, else the same key of the checkpoint the run was loaded from (``--load``), and so
    on: a run fine-tuned from a converted checkpoint does not record the Hugging Face architecture
    itself, its starting checkpoint does. None when no ancestor has it (or one is gone)."""
    from megatron.flexsp.training.checkpoint_format import CheckpointError, find_checkpoint, read_meta

    for _ in range(hops):
        if args.get(key) is not None:
            return args[key]
        load = args.get("load")
        if not load:
            return None
        try:
            args = read_meta(find_checkpoint(load)).get("args") or {}
        except (CheckpointError, OSError):
            return None
    return None


def _read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from megatron.flexsp.training import checkpoint_format, checkpointing

    try:
        if hasattr(checkpointing, "read_model_state"):  # contract C2
            return checkpointing.read_model_state(ckpt)
        path = checkpoint_format.find_checkpoint(ckpt)
        state = checkpoint_format.torch_load(path / checkpoint_format.MODEL_FILE)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, checkpoint_format.read_meta(path)
    except (checkpointing.CheckpointError, OSError) as e:
        raise ConvertError(f"--ckpt {ckpt}: {e}") from None


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    architecture: str | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
) -> HFModel:
    """Write a FlexSP checkpoint's model as a Hugging Face directory (config.json + model.safetensors,
    the tokenizer files of ``tokenizer`` copied); ConvertError before anything is written."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} already exists and is not empty")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ConvertError(f"--tokenizer {tokenizer}: not a directory")
    state, meta = _read_checkpoint(ckpt)
    if dtype is None:  # the imported model's own dtype (usually bfloat16), else float32
        dtype = inherited_arg(meta.get("args") or {}, "hf_dtype")
        dtype = dtype if dtype in _DTYPES else "float32"
    m = model_from_checkpoint(
        state, meta.get("args") or {}, architecture=architecture, vocab_size=vocab_size, dtype=dtype
    )
    tensors = megatron_to_hf(state, m, dtype=_DTYPES[dtype], consume=True)
    del state
    with hf_io.fresh_output(out, "--out") as tmp:
        hf_io.write_hf_dir(tmp, m.to_hf_config(), tensors)
        if tokenizer is not None:
            hf_io.copy_tokenizer(Path(tokenizer), tmp)
    return m
