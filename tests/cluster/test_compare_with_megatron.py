"""scripts/compare_with_megatron.sh --dry-run: the vanilla Megatron-LM command builds the same model
on the same data with one context-parallel degree (a2a) and packed documents; bad input is a clear
error; the tokens/s table is computed from both runs' logs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import megatron_flags  # noqa: E402

FLEXSP = [
    "--num-layers",
    "4",
    "--hidden-size",
    "128",
    "--num-attention-heads",
    "8",
    "--group-query-attention",
    "--num-query-groups",
    "4",
    "--swiglu",
    "--normalization",
    "LayerNorm",
    "--seq-length",
    "4096",
    "--global-batch-size",
    "64",
    "--train-iters",
    "30",
    "--lr",
    "3e-4",
    "--data-path",
    "0.3",
    "/d/a",
    "0.7",
    "/d/b",
    "--tokenizer-type",
    "HuggingFaceTokenizer",
    "--tokenizer-model",
    "/tok",
    "--bf16",
    "--sp-mode",
    "flexsp",
    "--flexsp-cost-model",
    "gpt-7b",
    "--metrics-file",
    "m.jsonl",
]


def dry_run(flags, *opts, mlm="fake", env_extra=None, tmp=None):
    env = dict(os.environ, PYTHON=sys.executable)
    if mlm == "fake":
        d = Path(tmp) / "Megatron-LM"
        d.mkdir(exist_ok=True)
        (d / "pretrain_gpt.py").write_text("")
        env["MEGATRON_LM_PATH"] = str(d)
    elif mlm is None:
        env.pop("MEGATRON_LM_PATH", None)
    env.update(env_extra or {})
    return subprocess.run(
        ["bash", str(ROOT / "scripts/compare_with_megatron.sh"), "--dry-run", *opts, "--", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def commands(out: str) -> tuple[list[str], list[str]]:
    lines = [x for x in out.splitlines() if x and not x.startswith("#")]
    assert len(lines) == 2, out
    f, m = shlex.split(lines[0]), shlex.split(lines[1])
    return f[f.index("pretrain_gpt_flexsp.py") + 1 :], m[
        next(i for i, x in enumerate(m) if x.endswith("pretrain_gpt.py")) + 1 :
    ]


def value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_dry_run_maps_model_data_and_parallelism(tmp_path):
    r = dry_run(FLEXSP, "--nproc", "8", "--cp", "4", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    f, m = commands(r.stdout)
    assert f == FLEXSP  # the FlexSP command is the user's, untouched
    for flag in (
        "--num-layers",
        "--hidden-size",
        "--num-attention-heads",
        "--num-query-groups",
        "--normalization",
        "--seq-length",
        "--train-iters",
        "--lr",
        "--tokenizer-model",
    ):
        assert value(m, flag) == value(FLEXSP, flag), flag
    for sw in (
        "--group-query-attention",
        "--swiglu",
        "--bf16",
        "--reset-position-ids",
        "--reset-attention-mask",
        "--eod-mask-loss",
        "--disable-bias-linear",
    ):
        assert sw in m, sw
    assert "--untie-embeddings-and-output-weights" not in m  # tied in both trainers unless the flag is given
    assert m[m.index("--data-path") + 1 : m.index("--data-path") + 5] == ["0.3", "/d/a", "0.7", "/d/b"]
    assert value(m, "--context-parallel-size") == "4" and value(m, "--cp-comm-type") == "a2a"
    assert value(m, "--tokenizer-type") == "HuggingFaceTokenizer"
    # FlexSP's defaults that Megatron-LM does not share are written out
    assert value(m, "--ffn-hidden-size") == str(4 * 128)
    assert value(m, "--position-embedding-type") == "rope"
    assert value(m, "--max-position-embeddings") == "4096"
    # data parallel 2: the global batch is a multiple of it
    assert int(value(m, "--global-batch-size")) % 2 == 0 and value(m, "--micro-batch-size") == "1"
    # FlexSP-only flags never reach Megatron-LM
    for flag in ("--sp-mode", "--flexsp-cost-model", "--metrics-file"):
        assert flag not in m
    assert "context parallel 4" in r.stdout


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_dry_run_defaults_cp_from_the_cost_model_and_tokenizer(tmp_path):
    # cpu-tiny holds 512 tokens per rank: a 2048-token document needs 4 ranks (static's choice)
    r = dry_run(["--seq-length", "2048"], "--nproc", "4", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    _, m = commands(r.stdout)
    assert value(m, "--context-parallel-size") == "4"
    assert value(m, "--tokenizer-type") == "NullTokenizer" and value(m, "--vocab-size") == "258"
    assert "--mock-data" in m and value(m, "--normalization") == "RMSNorm"
    # an explicit --context-parallel-size of the FlexSP run (static baseline) is kept
    r = dry_run(
        ["--seq-length", "1024", "--sp-mode", "static", "--context-parallel-size", "2"], "--nproc", "4", tmp=tmp_path
    )
    assert value(commands(r.stdout)[1], "--context-parallel-size") == "2"


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
@pytest.mark.parametrize(
    "flags,opts,mlm,msg",
    [
        (["--seq-length", "1024"], ("--nproc", "4", "--cp", "3"), "fake", "does not divide the world size 4"),
        (
            ["--num-attention-heads", "6", "--hidden-size", "96"],
            ("--nproc", "4", "--cp", "4"),
            "fake",
            "does not divide --num-attention-heads 6",
        ),
        (["--frobnicate", "3"], ("--nproc", "4"), "fake", "--frobnicate: no known Megatron-LM equivalent"),
        (["--seq-length", "1024"], ("--nproc", "4"), None, "set MEGATRON_LM_PATH"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, flags, opts, mlm, msg):
    r = dry_run(flags, *opts, mlm=mlm, tmp=tmp_path)
    assert r.returncode == 2 and msg in r.stderr, (r.stdout, r.stderr)


def test_table_tokens_per_s(tmp_path):
    fm = tmp_path / "flexsp.jsonl"
    recs = [
        {"iteration": i, "tokens": 10000, "iter_ms": ms, "tokens_per_s": 10000 / ms * 1e3, "sp_mode": "flexsp"}
        for i, ms in enumerate([900.0, 500.0, 400.0, 600.0], 1)
    ]
    fm.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ml = tmp_path / "megatron.log"
    ml.write_text(
        "".join(
            f" [2026-01-01 00:00:0{i}] iteration        {i}/       4 | consumed samples: {4 * i} | "
            f"elapsed time per iteration (ms): {ms} | learning rate: 1.0E-04 | global batch size:     4 |\n"
            for i, ms in enumerate([2000.0, 1500.0, 1000.0, 1000.0], 1)
        )
    )
    out = megatron_flags.table(str(fm), str(ml), gbs=4, seq_length=2048, cp=4, skip=2)
    f_tps = 20000 / 1.0  # iterations 3, 4: 20000 tokens in 1000 ms
    g_tps = 2 * 4 * 2048 / 2.0  # 16384 tokens in 2000 ms
    rows = out.splitlines()[1:]
    assert float(rows[0].split()[-2]) == pytest.approx(f_tps, abs=0.1)
    assert float(rows[1].split()[-2]) == pytest.approx(g_tps, abs=0.1)
    assert rows[0].split()[-1] == f"{f_tps / g_tps:.2f}x"
    with pytest.raises(megatron_flags.FlagError, match="elapsed time per iteration"):
        (tmp_path / "empty.log").write_text("no training here\n")
        megatron_flags.table(str(fm), str(tmp_path / "empty.log"), gbs=4, seq_length=2048, cp=4)


@pytest.mark.parametrize(
    "extra, expected, note",
    [
        (
            ["--ckpt-format", "torch_dist", "--async-save", "--finetune"],
            ["--ckpt-format", "torch_dist", "--async-save", "--finetune"],
            "",
        ),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
            ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
            "",
        ),
        (["--recompute-granularity", "auto"], ["--recompute-granularity", "full"], "auto -> full"),
    ],
)
def test_checkpoint_and_recompute_flags_keep_megatron_names(extra, expected, note):
    """Issues 18/19: Megatron-LM has these flags under the same names; FlexSP's per-group auto becomes full."""
    out = megatron_flags.translate(FLEXSP + extra, world_size=8, cp=4)
    m = out["megatron"]
    for flag in expected:
        assert flag in m, flag
    for a, b in zip(expected, expected[1:]):
        if not b.startswith("--"):
            assert m[m.index(a) + 1] == b
    assert note in " ".join(out["notes"])
