"""megatron.core ``dist_checkpointing`` interop: ``mcore-to-flexsp`` and ``flexsp-to-mcore``.

Why: users coming from vanilla Megatron bring checkpoints that ``dist_checkpointing.save`` wrote
from ``GPTModel.sharded_state_dict()`` (``--ckpt-format torch_dist``). Their keys are megatron's
*sharded* keys, not module names: layers are stacked along a leading axis
(``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[layers, ...]``), norms carry the
Transformer Engine names (``...linear_qkv.layer_norm_weight``) whichever layer spec wrote them, and
tensor/pipeline-parallel shards are pieces of one global tensor. The model's own
``sharded_state_dict()`` describes exactly that mapping for every module, so loading through it
needs no name table of ours: FlexSP's layer spec differs from megatron's only in the core
attention, which holds no parameters, and a checkpoint written with any TP/PP layout is read whole
by this one process (torch.distributed.checkpoint reassembles the global tensors).

What does not run on a CPU-only torch (megatron-core 0.16.1): ``dist_checkpointing.save`` with its
default ``torch_dist`` strategy. Its writer (``FileSystemWriterAsync``) calls
``torch.cuda.synchronize()`` after staging tensors, logs memory through ``psutil`` (not a dependency
here), and ``save_state_dict_async_finalize`` all-reduces a flag on ``torch.cuda.current_device()``.
``SyncTorchDistSaveStrategy`` below keeps megatron's own translation (sharded keys, main-replica
dedup, ``MCoreSavePlanner``) and writes through torch's synchronous ``FileSystemWriter``: the
same torch_dist layout (``.metadata``, ``__R_I.distcp``, ``common.pt``, ``metadata.json``), read
back by the stock ``dist_checkpointing.load`` (tested). ``dist_checkpointing.load`` itself runs
on CPU/gloo unchanged. FlexSP saves with this strategy on GPUs as well (one tested path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConvertError

__all__ = [
    "SyncTorchDistSaveStrategy",
    "mcore_checkpoint_dir",
    "megatron_lm_flags",
    "load_mcore_into",
    "save_mcore",
    "mcore_to_flexsp",
    "flexsp_to_mcore",
    "COMMAND_SPECS",
]

_LATEST = "latest_checkpointed_iteration.txt"  # Megatron-LM's --save directory


def _sync_strategy_cls():
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class _Sync(TorchDistSaveShardedStrategy):
        """megatron's torch_dist save, written synchronously by torch's FileSystemWriter (no CUDA needed)."""

        def save(self, sharded_state_dict, checkpoint_dir):  # replaces the async write + CUDA finalize
            import torch.distributed.checkpoint as dcp

            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp.save(
                mcore_to_pyt_state_dict(sd, False),
                storage_writer=dcp.FileSystemWriter(str(checkpoint_dir)),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
                ),
            )

    return _Sync


def SyncTorchDistSaveStrategy():  # noqa: N802 - a class built lazily (megatron is imported on first use)
    """A ``torch_dist`` save strategy for ``dist_checkpointing.save`` that runs on a CPU-only torch."""
    return _sync_strategy_cls()("torch_dist", 1)


def mcore_checkpoint_dir(path: str | Path) -> Path:
    """The dist checkpoint directory of ``path``: itself (has metadata.json) or, for a Megatron-LM
    ``--save`` directory, the iteration ``latest_checkpointed_iteration.txt`` names."""
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    latest = p / _LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        sub = (
            p / ("release" if tag == "release" else f"iter_{int(tag):07d}")
            if tag.isdigit() or tag == "release"
            else None
        )
        if sub is None or not (sub / "metadata.json").is_file():
            raise ConvertError(f"--mcore {p}: {_LATEST} names {tag!r}, which is not a dist checkpoint there")
        return sub
    if not p.is_dir():
        raise ConvertError(f"--mcore {p}: no such directory")
    raise ConvertError(f"--mcore {p}: neither a dist checkpoint (metadata.json) nor a Megatron-LM save dir ({_LATEST})")


def _check_backend(ckpt_dir: Path) -> None:
    try:
        meta = json.loads((ckpt_dir / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"--mcore {ckpt_dir}: unreadable metadata.json ({e})") from None
    backend = meta.get("sharded_backend")
    if backend != "torch_dist":
        raise ConvertError(f"--mcore {ckpt_dir}: sharded_backend {backend!r}; only torch_dist is read")


def load_mcore_into(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Fill ``model`` (a megatron GPTModel, FlexSP or stock spec, not yet sharded) from a dist checkpoint.

    Every tensor the model has must be in the checkpoint with its global shape; the checkpoint may
    hold more (optimizer states, RNG, other entries of a Megatron-LM save), which are not read.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = mcore_checkpoint_dir(checkpoint_dir)
    _check_backend(ckpt_dir)
    from torch.distributed.checkpoint.api import CheckpointException

    sharded = model.sharded_state_dict()
    _refuse_unread_weights(ckpt_dir, sharded)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir), common_strategy=_model_only_common_strategy())
    except (Exception, CheckpointException) as e:  # torch's is a BaseException wrapping megatron's, per rank
        raise ConvertError(f"--mcore {ckpt_dir} does not fit this model: {_first_line(e)}") from None
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConvertError(f"--mcore {ckpt_dir}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def _model_only_common_strategy():
    """megatron's common-data loader without common.pt: a model's tensors are all in the sharded part, and
    a Megatron-LM run pickles its argparse args there, which torch's weights-only loading refuses."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _ModelOnly(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):  # replaces torch.load(common.pt): nothing of it is needed
            return {}

    return _ModelOnly()


def _refuse_unread_weights(ckpt_dir: Path, sharded: dict[str, Any]) -> None:
    """A model tensor of the checkpoint that this model has no place for (linear biases of Megatron-LM's
    default, a LayerNorm bias, an untied output layer) would be dropped silently: refuse it, named."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        saved = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    except Exception as e:  # a damaged or foreign .metadata
        raise ConvertError(f"--mcore {ckpt_dir}: unreadable .metadata ({_first_line(e)})") from None
    wanted = {getattr(v, "key", None) for v in sharded.values()}
    model_part = ("embedding.", "decoder.", "output_layer.")
    extra = sorted(
        k
        for k in saved
        if k.startswith(model_part) and "_extra_state" not in k and k not in wanted and hasattr(saved[k], "size")
    )
    if extra:
        raise ConvertError(
            f"--mcore {ckpt_dir} holds {extra[0]}, which this model lacks"
            + (" (FlexSP's layers have no linear biases)" if extra[0].endswith(".bias") else " (check the model flags)")
        )


def save_mcore(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Write ``model`` (a megatron GPTModel) with ``dist_checkpointing.save`` into a new directory."""
    from megatron.core import dist_checkpointing

    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save wants it to exist, empty
    # the synchronous writer on GPU too: one tested path, and megatron's async one also needs psutil there
    strategy = SyncTorchDistSaveStrategy()
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir), sharded_strategy=strategy)


def _first_line(e: BaseException) -> str:
    """The message of ``e``, or of the exception a rank raised inside torch's CheckpointException (whose
    text is one traceback per rank), on one line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    msg = raised[-1].split(": ", 1)[1] if raised else lines[0]
    missing = re.match(r'^"?(\S+) from model not in state dict', msg)  # megatron then lists every key it has
    return f"{missing.group(1)} is not in the checkpoint" if missing else msg[:400]


def _model_config(model_argv: Sequence[str]):
    """GPTConfig of the trainer's model flags (``--model-preset`` / ``--num-layers`` ...), validated."""
    from megatron.flexsp.training import arguments as A
    from megatron.flexsp.training.configs import model_config_from_args

    with _argparse_errors("model flags"):
        args = A.parse_args(list(model_argv))
    try:
        A.validate_args(args, 1, has_cuda=True)  # the shape checks; a conversion runs on no device
        return model_config_from_args(args, cuda=False), args
    except (A.ArgumentError, ValueError) as e:
        raise ConvertError(str(e)) from None


@contextlib.contextmanager
def _argparse_errors(what: str) -> Iterator[None]:
    """argparse's exit on a bad model flag becomes a ConvertError (one line, exit code 2)."""
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    try:
        with redirect_stderr(buf):
            yield
    except SystemExit:
        lines = [line for line in buf.getvalue().splitlines() if "error:" in line]
        raise ConvertError(f"{what}: {lines[-1].split('error:', 1)[1].strip() if lines else 'invalid'}") from None


# Megatron-LM settings FlexSP's model cannot represent, and the value that it can (args of common.pt).
_UNSUPPORTED = {
    "num_experts": None,
    "qk_layernorm": False,
    "rotary_interleaved": False,
    "apply_layernorm_1p": False,
    "multi_latent_attention": False,
}


def megatron_lm_flags(ckpt_dir: Path) -> list[str] | None:
    """The trainer's model flags from the ``args`` a Megatron-LM run stores in the checkpoint's common.pt,
    or None when there are none (then the user gives the flags); ConvertError for what FlexSP cannot build."""
    path = ckpt_dir / "common.pt"
    if not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # other pickled types in the args: the user gives the model flags
        return None
    args = common.get("args") if isinstance(common, dict) else None
    a = vars(args) if isinstance(args, argparse.Namespace) else None
    if not a or not a.get("num_layers"):
        return None
    for key, ok in _UNSUPPORTED.items():
        if a.get(key, ok) not in (ok, 0):
            raise ConvertError(f"--mcore {ckpt_dir}: Megatron-LM args {key}={a[key]!r}; FlexSP's GPT cannot build it")
    if a.get("rotary_percent", 1.0) != 1.0:
        raise ConvertError(f"--mcore {ckpt_dir}: Megatron-LM args rotary_percent={a['rotary_percent']}; only 1.0")
    heads, hidden = a.get("num_attention_heads"), a.get("hidden_size")
    if a.get("kv_channels") not in (None, (hidden or 0) // (heads or 1)):
        raise ConvertError(f"--mcore {ckpt_dir}: Megatron-LM args kv_channels={a['kv_channels']} != hidden / heads")
    return _model_flags_of(a, a.get("padded_vocab_size") or a.get("vocab_size"))


# The model flags shared by the trainer and Megatron-LM (same names), with a value or as switches.
_VALUED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
_VALUED += ("normalization", "position_embedding_type", "max_position_embeddings", "seq_length")
_VALUED += ("rotary_base", "norm_epsilon", "rope_scaling_factor")
_SWITCHES = ("swiglu", "group_query_attention", "add_qkv_bias", "use_rope_scaling")
_SWITCHES += ("untie_embeddings_and_output_weights",)


def _model_flags_of(a: dict[str, Any], table_rows: int | None) -> list[str]:
    """Flags from a run's recorded args (argparse dest names); the embedding table as recorded, unpadded."""
    argv: list[str] = []
    for key in _VALUED:
        if a.get(key) is not None:
            argv += ["--" + key.replace("_", "-"), str(a[key])]
    argv += ["--" + k.replace("_", "-") for k in _SWITCHES if a.get(k)]
    if table_rows:
        argv += ["--vocab-size", str(table_rows), "--make-vocab-size-divisible-by", "1"]
    return argv


def mcore_to_flexsp(mcore: str | Path, out: str | Path, model_argv: Sequence[str] = ()) -> Path:
    """A megatron.core dist checkpoint -> a FlexSP checkpoint (model only, iteration 0, for --load --finetune).

    ``model_argv``: the trainer's model flags; by default those of the Megatron-LM args in common.pt."""
    from megatron.flexsp.runtime.model import build_gpt_model

    from .hf import _one_process
    from .hf_io import fresh_output

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} already exists and is not empty")
    ckpt_dir = mcore_checkpoint_dir(mcore)
    _check_backend(ckpt_dir)
    if not model_argv:
        model_argv = megatron_lm_flags(ckpt_dir) or []
        if not model_argv:
            raise ConvertError(f"--mcore {ckpt_dir} records no Megatron-LM args: give the model flags after --")
    cfg, args = _model_config(model_argv)
    from megatron.flexsp.training.checkpointing import save_checkpoint

    record = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))}
    record["converted_from"] = str(ckpt_dir.resolve())
    with _one_process(cfg.seed):
        model = build_gpt_model(cfg, device="cpu")
        load_mcore_into(model, ckpt_dir)
        with fresh_output(out, "--out") as tmp:
            save_checkpoint(tmp, 0, model, None, args=record)
    return out


def _args_of_checkpoint(state: dict[str, torch.Tensor], saved: dict[str, Any]) -> list[str]:
    """The model flags that rebuild a FlexSP checkpoint's model: its run's flags, with the table size,
    tying and grouped-query attention read from the tensors and shapes (older runs predate some flags)."""
    emb = state.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConvertError("the checkpoint has no embedding.word_embeddings.weight")
    a = dict(saved, untie_embeddings_and_output_weights="output_layer.weight" in state)
    a["group_query_attention"] = saved.get("num_query_groups") not in (None, saved.get("num_attention_heads"))
    return _model_flags_of(a, emb.shape[0])


def flexsp_to_mcore(ckpt: str | Path, out: str | Path, model_argv: Sequence[str] = ()) -> Path:
    """A FlexSP checkpoint -> a megatron.core dist checkpoint (``dist_checkpointing.load`` reads it)."""
    from megatron.flexsp.runtime.model import build_gpt_model

    from .hf import _one_process, _read_checkpoint
    from .hf_io import fresh_output

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} already exists and is not empty")
    state, meta = _read_checkpoint(Path(ckpt))
    cfg, _ = _model_config(list(model_argv) or _args_of_checkpoint(state, meta.get("args") or {}))
    with _one_process(cfg.seed):
        model = build_gpt_model(cfg, device="cpu")
        own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
        if own != set(state):
            raise ConvertError(
                f"--ckpt {ckpt} does not fit the model flags: missing {sorted(own - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - own)[:3]}"
            )
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ConvertError(f"--ckpt {ckpt} does not fit the model flags: {_first_line(e)}") from None
        with fresh_output(out, "--out") as tmp:
            save_mcore(model, tmp)
    return out


# ------------------------------------------------------------------------------ flexsp-convert commands
def _model_flags_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_flags",
        nargs=argparse.REMAINDER,
        help="after --: the trainer's model flags (--model-preset NAME, --num-layers ...); mcore-to-flexsp "
        "defaults to those of the Megatron-LM args in the checkpoint's common.pt",
    )


def _mcore_to_flexsp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mcore", required=True, metavar="DIR", help="dist checkpoint, or Megatron-LM --save directory")
    p.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory (for --load CKPT --finetune)")
    _model_flags_arg(p)


def _flags(a: argparse.Namespace) -> list[str]:
    flags = list(a.model_flags or [])
    return flags[1:] if flags[:1] == ["--"] else flags


def _mcore_to_flexsp(a: argparse.Namespace) -> int:
    flags = _flags(a) or megatron_lm_flags(mcore_checkpoint_dir(a.mcore)) or []
    out = mcore_to_flexsp(a.mcore, a.out, flags)
    print(f"wrote {out}; train it with: pretrain_gpt_flexsp.py --load {out} --finetune {' '.join(flags)}")
    return 0


def _flexsp_to_mcore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint or --save directory (newest good one)")
    p.add_argument("--out", required=True, metavar="DIR", help="new dist checkpoint directory")
    _model_flags_arg(p)


def _flexsp_to_mcore(a: argparse.Namespace) -> int:
    out = flexsp_to_mcore(a.ckpt, a.out, _flags(a))
    print(f"wrote {out} (megatron.core dist_checkpointing, torch_dist)")
    return 0


# flexsp-convert's table entries of this module: name -> (help, add_arguments, run); cli.py makes them Commands
# (this module does not import cli: no import cycle).
COMMAND_SPECS: dict[str, tuple[str, Any, Any]] = {
    "mcore-to-flexsp": (
        "megatron.core dist checkpoint (GPTModel) -> FlexSP checkpoint",
        _mcore_to_flexsp_args,
        _mcore_to_flexsp,
    ),
    "flexsp-to-mcore": ("FlexSP checkpoint -> megatron.core dist checkpoint", _flexsp_to_mcore_args, _flexsp_to_mcore),
}
