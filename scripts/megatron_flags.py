"""Translate a pretrain_gpt_flexsp.py command line into the equivalent vanilla Megatron-LM one.

Used by scripts/compare_with_megatron.sh; the mapping is documented in
docs/compare_with_megatron.md. Torch-free (it reads the cost model through the planner only).

Vanilla Megatron runs every sequence with one context-parallel degree (``--context-parallel-size
D --cp-comm-type a2a``, Ulysses-style all-to-all in Transformer Engine) on packed windows of
``--seq-length`` tokens whose documents do not see each other (``--reset-position-ids
--reset-attention-mask --eod-mask-loss``): the configuration FlexSP's ``--sp-mode static``
reproduces and FlexSP is measured against.

    python scripts/megatron_flags.py --world-size 8 [--cp D] [--megatron-global-batch-size G]
        [--megatron-fsdp] [--format shell|json] -- <pretrain_gpt_flexsp.py flags>
    python scripts/megatron_flags.py table --flexsp-metrics F.jsonl --megatron-log M.log --gbs G
        --seq-length S --cp D
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence

# Same name and meaning in both trainers: copied with their value. True: when not given, FlexSP's
# default is written out (a model or optimisation setting; Megatron-LM's default differs). False:
# derived alike in both trainers (query groups, decay iterations), the data split, or paths,
# logging destinations and run control (no default to match).
_COPIED: dict[str, bool] = {
    "--num-layers": True,
    "--hidden-size": True,
    "--ffn-hidden-size": True,
    "--num-attention-heads": True,
    "--num-query-groups": False,
    "--position-embedding-type": True,
    "--normalization": True,
    "--max-position-embeddings": True,
    "--seq-length": True,
    "--tokenizer-model": False,
    "--train-iters": True,
    "--lr": True,
    "--min-lr": True,
    "--lr-warmup-iters": True,
    "--lr-decay-iters": False,
    "--lr-decay-style": True,
    "--weight-decay": True,
    "--clip-grad": True,
    "--adam-beta1": True,
    "--adam-beta2": True,
    "--adam-eps": True,
    "--seed": True,
    "--split": False,
    "--log-interval": True,
    "--init-method-std": True,
    "--save": False,
    "--load": False,
    "--save-interval": False,
    "--tensorboard-dir": False,
    "--wandb-project": False,
    "--wandb-exp-name": False,
    "--eval-interval": False,
    "--eval-iters": False,
    "--exit-interval": False,
    # architecture of real checkpoints (issue 18): same names, same defaults in both trainers
    "--norm-epsilon": False,
    "--rotary-base": False,
    "--rope-scaling-factor": False,
    "--make-vocab-size-divisible-by": False,
    # checkpoints and recomputation (issues 18, 19): Megatron-LM's names and values
    "--ckpt-format": False,
    "--recompute-method": False,
    "--recompute-num-layers": False,
}
SAME_VALUE = tuple(_COPIED)
SAME_SWITCH = (
    "--group-query-attention",
    "--swiglu",
    "--bf16",
    "--mock-data",
    "--untie-embeddings-and-output-weights",
    "--add-qkv-bias",
    "--use-rope-scaling",
    "--async-save",
    "--finetune",
)
# FlexSP-only: no Megatron counterpart; dropped from the vanilla command (value-taking ones).
FLEXSP_ONLY_VALUE = (
    "--sp-mode",
    "--flexsp-cost-model",
    "--flexsp-time-limit",
    "--flexsp-plan-ahead",
    "--flexsp-dump-plans",
    "--flexsp-sharding",
    "--metrics-file",
    "--overlong",
    "--stdlib-granularity",
    "--mock-data-num-docs",
    "--mock-data-median",
    "--mock-data-sigma",
    "--mock-data-tail-frac",
    "--mock-data-pareto-alpha",
    "--mock-data-min-len",
    "--mock-data-max-len",
    "--micro-batch-size",
)
# (--disable-bias-linear is always written for Megatron-LM, whose layers have biases by default.)
FLEXSP_ONLY_SWITCH = ("--no-progress-bar", "--no-save-final", "--disable-bias-linear")
# Translated (handled below): --global-batch-size, --context-parallel-size, --data-path (nargs),
# --tokenizer-type, --vocab-size, --transformer-impl, --attention-backend, --distributed-backend,
# --tensor-model-parallel-size, --pipeline-model-parallel-size.
_ATTN = {
    "te": "fused",
    "fused": "fused",
    "flash": "flash",
    "auto": "auto",
    "sdpa": "auto",
    "unfused": "unfused",
    "local": "auto",
}


class FlagError(ValueError):
    """A FlexSP flag that cannot be translated; the message names it."""


def _parse(argv: Sequence[str]) -> dict[str, object]:
    """Flag -> value (str), True for switches, list for --data-path. Later flags win, like argparse."""
    out: dict[str, object] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise FlagError(f"unexpected argument {a!r} (flags only)")
        if "=" in a:
            a, v = a.split("=", 1)
            argv[i + 1 : i + 1] = [v]
        if a in SAME_SWITCH or a in FLEXSP_ONLY_SWITCH:
            out[a] = True
            i += 1
        elif a == "--data-path":
            vals = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                vals.append(argv[i])
                i += 1
            if not vals:
                raise FlagError("--data-path needs at least one prefix")
            out[a] = vals
        else:
            known = (
                SAME_VALUE
                + FLEXSP_ONLY_VALUE
                + (
                    "--global-batch-size",
                    "--context-parallel-size",
                    "--tokenizer-type",
                    "--vocab-size",
                    "--transformer-impl",
                    "--attention-backend",
                    "--distributed-backend",
                    "--tensor-model-parallel-size",
                    "--pipeline-model-parallel-size",
                    "--model-preset",
                    "--recompute-granularity",
                )
            )
            if a not in known:
                raise FlagError(f"{a}: no known Megatron-LM equivalent (see docs/compare_with_megatron.md)")
            if i + 1 >= len(argv):
                raise FlagError(f"{a} needs a value")
            out[a] = argv[i + 1]
            i += 2
    return out


# Model and optimisation flags whose FlexSP default is passed explicitly to Megatron-LM.
_WRITE_DEFAULT = tuple(f for f, write in _COPIED.items() if write)


def _flexsp_defaults() -> dict[str, object]:
    """The trainer's defaults, read from its own parser (and the CPU cost-model preset it starts from)."""
    from megatron.flexsp.training.arguments import build_parser
    from megatron.flexsp.training.cost_setup import DEFAULT_CPU_PRESET

    ns = vars(build_parser().parse_args([]))
    out: dict[str, object] = {"--" + k.replace("_", "-"): v for k, v in ns.items()}
    out["--flexsp-cost-model"] = out["--flexsp-cost-model"] or DEFAULT_CPU_PRESET
    return out


def _expand_preset(flags: dict[str, object]) -> dict[str, object]:
    """--model-preset NAME as the architecture flags it sets (Megatron-LM has no presets); given flags win."""
    name = flags.pop("--model-preset", None)
    if name is None:
        return flags
    from megatron.flexsp.planner.model_presets import MODEL_PRESET_NAMES
    from megatron.flexsp.training.flags import preset_flag_defaults

    if name not in MODEL_PRESET_NAMES:
        raise FlagError(f"--model-preset {name}: unknown (presets: {', '.join(MODEL_PRESET_NAMES)})")
    out: dict[str, object] = {}
    for dest, v in preset_flag_defaults(str(name)).items():
        flag = "--" + dest.replace("_", "-")
        if flag in flags or v is False:
            continue
        out[flag] = True if v is True else str(v)
    return {**out, **flags}


def _smallest_cp(flags: dict[str, object], world_size: int) -> int:
    """The smallest allowed degree that holds --seq-length (what --sp-mode static would pick).

    ``flags``: the given flags over the trainer's defaults."""
    from megatron.flexsp.planner.presets import load_cost_model

    seq = int(str(flags["--seq-length"]))
    spec = str(flags["--flexsp-cost-model"])
    cost = load_cost_model(spec, world_size)
    d = cost.smallest_degree(seq, world_size)
    if d is None:
        raise FlagError(f"--seq-length {seq} fits no SP degree on {world_size} ranks under cost model {spec!r}")
    return d


def translate(
    flexsp_argv: Sequence[str],
    *,
    world_size: int,
    cp: int | None = None,
    megatron_gbs: int | None = None,
    fsdp: bool = False,
) -> dict[str, object]:
    """{'flexsp': argv, 'megatron': argv, 'cp': D, 'dp': world/D, 'notes': [...]} for one comparison."""
    if world_size < 1:
        raise FlagError(f"world size must be >= 1, got {world_size}")
    flags = _expand_preset(_parse(flexsp_argv))
    # FlexSP's own defaults are written out: Megatron-LM's differ (LayerNorm, learned positions,
    # a 2/3 SwiGLU width, no default model size), and the two runs must build the same model.
    defaults = _flexsp_defaults()
    value = {**defaults, **flags}  # what the FlexSP run uses
    notes: list[str] = []
    for name in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        if name in flags and str(flags[name]) != "1":
            raise FlagError(f"{name} {flags[name]}: FlexSP runs with 1, the comparison keeps both sides equal")
    if cp is None and "--context-parallel-size" in flags:
        cp = int(str(flags["--context-parallel-size"]))
    if cp is None:
        cp = _smallest_cp(value, world_size)
        notes.append(f"--context-parallel-size {cp}: the smallest degree that holds --seq-length (as --sp-mode static)")
    if cp < 1 or world_size % cp:
        raise FlagError(f"--context-parallel-size {cp} does not divide the world size {world_size}")
    heads = int(str(value["--num-attention-heads"]))
    if heads % cp:
        raise FlagError(f"--context-parallel-size {cp} does not divide --num-attention-heads {heads} (a2a needs it)")
    seq = int(str(value["--seq-length"]))
    if seq % (2 * cp):
        notes.append(f"Megatron's context parallelism wants --seq-length divisible by 2 x CP = {2 * cp}")
    dp = world_size // cp

    hidden = int(str(value["--hidden-size"]))
    defaults["--ffn-hidden-size"] = 4 * hidden  # megatron.core's TransformerConfig default, used by FlexSP
    defaults["--max-position-embeddings"] = seq
    m: list[str] = []
    for name in SAME_VALUE:
        if name in flags:
            m += [name, str(flags[name])]
        elif name in _WRITE_DEFAULT and defaults.get(name) is not None:
            m += [name, str(defaults[name])]
    for name in SAME_SWITCH:
        if name in flags:
            m.append(name)
    if "--data-path" in flags:
        m += ["--data-path", *flags["--data-path"]]  # type: ignore[misc]
    granularity = flags.get("--recompute-granularity")
    if granularity == "auto":  # Megatron-LM fixes one mode per run; its long-context users run full
        m += ["--recompute-granularity", "full"]
        notes.append("--recompute-granularity auto -> full on the Megatron side (Megatron-LM has no per-group choice)")
    elif granularity is not None:
        m += ["--recompute-granularity", str(granularity)]
    tok = flags.get("--tokenizer-type")
    vocab = flags.get("--vocab-size")
    if tok in (None, "ByteTokenizer"):
        # FlexSP's built-in byte tokenizer (BYTE_VOCAB_SIZE ids) has no Megatron twin: Megatron's NullTokenizer
        # with the same vocabulary keeps the embedding and output sizes equal.
        from megatron.flexsp.data.tokenizer import BYTE_VOCAB_SIZE

        m += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab or BYTE_VOCAB_SIZE)]
        notes.append("ByteTokenizer -> NullTokenizer with the same --vocab-size (identical model shapes)")
        if "--data-path" not in flags and "--mock-data" not in flags:
            m.append("--mock-data")
            notes.append(
                "FlexSP's default stdlib corpus has no Megatron .bin/.idx: the vanilla run uses --mock-data "
                "(preprocess a corpus with scripts/preprocess_data.py and pass --data-path to compare on "
                "the same documents)"
            )
    else:
        m += ["--tokenizer-type", str(tok)]
        if vocab is not None:
            m += ["--vocab-size", str(vocab)]
    gbs = megatron_gbs
    if gbs is None:
        gbs = int(str(flags.get("--global-batch-size", 32)))
        notes.append(
            "--global-batch-size: FlexSP counts documents, Megatron windows of --seq-length tokens; the "
            "runner sets it from FlexSP's measured tokens per iteration (tokens/s is compared)"
        )
    gbs = max(dp, -(-gbs // dp) * dp)  # a multiple of the data-parallel size (micro-batch size 1)
    m += ["--global-batch-size", str(gbs), "--micro-batch-size", "1"]
    # parallelism: one CP degree for every sequence, Ulysses all-to-all, ZeRO for the model states
    m += [
        "--context-parallel-size",
        str(cp),
        "--cp-comm-type",
        "a2a",
        "--tensor-model-parallel-size",
        "1",
        "--pipeline-model-parallel-size",
        "1",
        "--transformer-impl",
        "transformer_engine",
        "--attention-backend",
        _ATTN.get(str(flags.get("--attention-backend", "auto")), "auto"),
        "--distributed-backend",
        str(flags.get("--distributed-backend", "nccl")),
    ]
    if str(flags.get("--transformer-impl", "local")) != "transformer_engine":
        notes.append(
            "--transformer-impl transformer_engine on the Megatron side: its a2a context parallelism "
            "lives in Transformer Engine"
        )
    m += ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"] if fsdp else ["--use-distributed-optimizer"]
    # packed documents that never attend across boundaries, FlexSP's model defaults
    m += [
        "--reset-position-ids",
        "--reset-attention-mask",
        "--eod-mask-loss",
        "--disable-bias-linear",
        "--attention-dropout",
        "0",
        "--hidden-dropout",
        "0",
        "--log-throughput",
    ]
    if "--eval-interval" not in flags:
        m += ["--eval-interval", str(10**9), "--eval-iters", "0"]

    fx = list(flexsp_argv)
    if "--sp-mode" not in flags:
        fx += ["--sp-mode", "flexsp"]
    return {"flexsp": fx, "megatron": m, "cp": cp, "dp": dp, "global_batch_size": gbs, "notes": notes}


_MEGATRON_ITER = re.compile(r"iteration\s+(\d+)\s*/\s*\d+ .*?elapsed time per iteration \(ms\):\s*([0-9.]+)")


def megatron_iterations(log_text: str) -> list[tuple[int, float]]:
    """(iteration, ms) from Megatron-LM's training log lines."""
    return [(int(i), float(ms)) for i, ms in _MEGATRON_ITER.findall(log_text)]


def tokens_per_s(ms: Sequence[float], tokens: Sequence[float]) -> float:
    return sum(tokens) / (sum(ms) / 1e3)


def table(flexsp_metrics: str, megatron_log: str, *, gbs: int, seq_length: int, cp: int, skip: int = 2) -> str:
    """Tokens/s of both runs (warm-up iterations left out) as one small table."""
    recs = [json.loads(x) for x in open(flexsp_metrics).read().splitlines() if x.strip()]
    if not recs:
        raise FlagError(f"{flexsp_metrics} holds no iterations")
    f = recs[skip:] if len(recs) > skip else recs[-1:]
    f_ms = [r["iter_ms"] for r in f]
    f_tok = [r["tokens"] if "tokens" in r else r["tokens_per_s"] * r["iter_ms"] / 1e3 for r in f]
    its = megatron_iterations(open(megatron_log).read())
    if not its:
        raise FlagError(f"no 'elapsed time per iteration' lines in {megatron_log} (did Megatron-LM train?)")
    g = its[skip:] if len(its) > skip else its[-1:]
    g_ms = [ms for _, ms in g]
    g_tok = [gbs * seq_length] * len(g)
    ft, gt = tokens_per_s(f_ms, f_tok), tokens_per_s(g_ms, g_tok)
    mode = recs[-1].get("sp_mode", "flexsp")
    rows = [
        (f"FlexSP ({mode})", "per batch", sum(f_ms) / len(f_ms), sum(f_tok) / len(f_tok), ft),
        (f"Megatron-LM (CP {cp}, a2a)", str(cp), sum(g_ms) / len(g_ms), float(gbs * seq_length), gt),
    ]
    out = [f"{'run':<28}{'CP':>10}{'ms/iter':>11}{'tokens/iter':>13}{'tokens/s':>12}{'speedup':>9}"]
    for name, c, ms, tok, tps in rows:
        out.append(f"{name:<28}{c:>10}{ms:>11.1f}{tok:>13.0f}{tps:>12.1f}{tps / gt:>8.2f}x")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if list(argv[:1]) == ["table"]:
        t = argparse.ArgumentParser(prog="megatron_flags.py table")
        for k in ("--flexsp-metrics", "--megatron-log"):
            t.add_argument(k, required=True)
        for k in ("--gbs", "--seq-length", "--cp"):
            t.add_argument(k, type=int, required=True)
        t.add_argument("--skip", type=int, default=2)
        ta = t.parse_args(argv[1:])
        try:
            print(
                table(ta.flexsp_metrics, ta.megatron_log, gbs=ta.gbs, seq_length=ta.seq_length, cp=ta.cp, skip=ta.skip)
            )
        except (FlagError, OSError, KeyError, ValueError) as e:
            print(f"compare_with_megatron: error: {e}", file=sys.stderr)
            return 2
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--cp", type=int, default=None)
    p.add_argument("--megatron-global-batch-size", type=int, default=None)
    p.add_argument("--megatron-fsdp", action="store_true")
    p.add_argument("--format", choices=["shell", "json"], default="shell")
    p.add_argument("flags", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    try:
        r = translate(
            flags, world_size=a.world_size, cp=a.cp, megatron_gbs=a.megatron_global_batch_size, fsdp=a.megatron_fsdp
        )
    except (FlagError, ValueError) as e:
        print(f"compare_with_megatron: error: {e}", file=sys.stderr)
        return 2
    if a.format == "json":
        print(json.dumps(r, indent=2))
    else:  # bash arrays for compare_with_megatron.sh
        print("FLEXSP_ARGS=(" + " ".join(shlex.quote(x) for x in r["flexsp"]) + ")")
        print("MEGATRON_ARGS=(" + " ".join(shlex.quote(x) for x in r["megatron"]) + ")")
        print(f"CP={r['cp']}; DP={r['dp']}; MEGATRON_GBS={r['global_batch_size']}")
        print("NOTES=(" + " ".join(shlex.quote(x) for x in r["notes"]) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
