"""``flexsp-convert``: checkpoint conversions, one subcommand each, from the table ``COMMANDS``.

Why a table: conversions to and from other formats (Hugging Face here, megatron.core's
dist_checkpointing in ``mcore.py``) are added as one entry each, without touching the others.
Every command reports bad input as one line on stderr with exit code 2, before writing anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .command import Command
from .errors import ConvertError

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _hf_to_flexsp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hf", required=True, metavar="DIR", help="local transformers directory (config.json + safetensors)"
    )
    p.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory (for --load CKPT --finetune)")
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=_positive_int,
        default=128,
        help="pad the vocabulary table to a multiple of this, as the trainer's flag of that name does",
    )
    p.add_argument(
        "--vocab-size", type=_positive_int, default=None, help="the trainer's --vocab-size (default: config.json's)"
    )
    p.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default="local",
        help="layer spec the checkpoint is for (its norm parameter names differ)",
    )


def _hf_to_flexsp(a: argparse.Namespace) -> int:
    from .hf import import_hf

    res = import_hf(
        a.hf,
        a.out,
        make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
        vocab_size=a.vocab_size,
        transformer_impl=a.transformer_impl,
    )
    m = res.model
    print(
        f"wrote {res.checkpoint}: {m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"vocabulary {m.vocab_size} (table {res.padded_vocab_size} rows)"
    )
    print("train it with: pretrain_gpt_flexsp.py --load", res.checkpoint, "--finetune", " ".join(res.flags))
    return 0


def _flexsp_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, metavar="CKPT", help="checkpoint directory or --save directory (newest good one)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="new transformers directory")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="copy this directory's tokenizer files")
    p.add_argument(
        "--architecture",
        default=None,
        help="LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM (default: the imported model's; "
        "Qwen2 with q/k/v biases, else Llama)",
    )
    p.add_argument(
        "--vocab-size", type=_positive_int, default=None, help="real vocabulary (default: the run's --vocab-size)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="tensor dtype of the export (default: the imported model's torch_dtype, else float32)",
    )


def _flexsp_to_hf(a: argparse.Namespace) -> int:
    from .hf import export_hf

    m = export_hf(
        a.ckpt, a.out, tokenizer=a.tokenizer, architecture=a.architecture, vocab_size=a.vocab_size, dtype=a.dtype
    )
    print(f"wrote {a.out}: {m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, vocabulary {m.vocab_size}")
    return 0


COMMANDS: dict[str, Command] = {
    "hf-to-flexsp": Command(
        "Hugging Face Llama / Qwen2 / Mistral directory -> FlexSP checkpoint", _hf_to_flexsp_args, _hf_to_flexsp
    ),
    "flexsp-to-hf": Command("FlexSP checkpoint -> Hugging Face directory", _flexsp_to_hf_args, _flexsp_to_hf),
}


def _register_mcore() -> None:
    """megatron.core dist_checkpointing conversions (mcore.py): mcore-to-flexsp, flexsp-to-mcore."""
    from .mcore import COMMAND_SPECS

    COMMANDS.update({name: Command(*spec) for name, spec in COMMAND_SPECS.items()})


_register_mcore()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexsp-convert", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; bad input (ConvertError) is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except ConvertError as e:
        print(f"flexsp-convert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
