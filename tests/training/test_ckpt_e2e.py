"""Checkpoints through the real entry point (torchrun, gloo ranks): a flipped byte in one rank's shard
of the newest checkpoint makes the relaunch resume from the previous one with a warning, with the
same losses as the first run; --async-save torch_dist checkpoints resume exactly on the same ranks
and resharded on fewer; a damaged dataset index stops start-up with one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "256",
    "--global-batch-size",
    "4",
    "--lr",
    "2e-3",
    "--lr-warmup-iters",
    "1",
    "--lr-decay-iters",
    "6",
    "--seed",
    "3",
    "--mock-data",
    "--flexsp-plan-ahead",
    "0",
    "--no-progress-bar",
    "--log-interval",
    "1",
]


def _run(args: list[str], log: Path, timeout: float = 240, nproc: int = 2) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "pretrain_gpt_flexsp.py"),
    ] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)


def _losses(path: Path) -> dict[int, float]:
    return {x["iteration"]: x["loss"] for x in map(json.loads, path.read_text().splitlines()) if "loss" in x}


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_flipped_byte_in_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    ckpt, m1, m2 = tmp_path / "ckpt", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = BASE + ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"]
    rc = _run(common + ["--train-iters", "4", "--metrics-file", str(m1)], tmp_path / "a.log")
    assert rc == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    f = ckpt / "iter_0000004" / "dist" / "__1_0.distcp"  # rank 1's shard (torch_dist, the default format)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    rc = _run(common + ["--train-iters", "6", "--metrics-file", str(m2)], tmp_path / "b.log")
    log = (tmp_path / "b.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"checkpoint {ckpt / 'iter_0000004'} failed verification" in log, log[-3000:]
    assert f"falling back to {ckpt / 'iter_0000002'}" in log
    assert f"resumed from {ckpt / 'iter_0000002'} at iteration 2" in log
    first, second = _losses(m1), _losses(m2)
    assert sorted(second) == [3, 4, 5, 6]
    for it in (3, 4):  # iterations 3-4 retrained from the good checkpoint: the same losses
        assert abs(second[it] - first[it]) <= 2e-5 * abs(first[it]) + 1e-6, (it, first, second)
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"


@pytest.mark.slow  # three torchrun launches: ~1.5 min on 2 cores
def test_async_torch_dist_checkpoints_resume_on_the_same_and_on_fewer_ranks(tmp_path):
    """The trainer's own path: --async-save torch_dist checkpoints every 2 iterations of a 2-rank run;
    resumed from iteration 4 on 2 ranks the losses are the uninterrupted run's (as in the flipped-byte
    test; bit for bit in test_ckpt_dist, where no planner budget is involved), on 1 rank (resharded,
    same batches) within 1e-5."""
    ckpt, m1 = tmp_path / "ckpt", tmp_path / "a.jsonl"
    rc = _run(
        BASE
        + [
            "--train-iters",
            "6",
            "--save",
            str(ckpt),
            "--save-interval",
            "2",
            "--async-save",
            "--metrics-file",
            str(m1),
        ],
        tmp_path / "a.log",
    )
    log = (tmp_path / "a.log").read_text()
    assert rc == 0, log[-3000:]
    assert "written in the background" in log and f"saved checkpoint {ckpt / 'iter_0000004'} (in the background" in log
    meta = json.loads((ckpt / "iter_0000004" / "meta.json").read_text())
    assert meta["ckpt_format"] == "torch_dist" and meta["world_size"] == 2
    # the last save (iteration 6) was in flight when training ended: the exit waited for it
    assert (ckpt / "latest").read_text().strip() == "iter_0000006" and not list(ckpt.glob(".tmp-*"))
    first = _losses(m1)
    for nproc in (2, 1):
        m = tmp_path / f"r{nproc}.jsonl"
        args = BASE + ["--train-iters", "6", "--load", str(ckpt), "--load-step", "4", "--metrics-file", str(m)]
        rc = _run(args, tmp_path / f"r{nproc}.log", nproc=nproc)
        log = (tmp_path / f"r{nproc}.log").read_text()
        assert rc == 0, log[-3000:]
        got = _losses(m)
        assert sorted(got) == [5, 6]
        if nproc == 2:  # the same state; plans under a wall-clock budget may sum in another order on a busy host
            assert all(abs(got[i] - first[i]) <= 2e-5 * abs(first[i]) + 1e-6 for i in (5, 6)), (got, first)
        else:
            assert "written by 2 ranks; this run has 1" in log
            assert abs(got[5] - first[5]) <= 1e-5 * abs(first[5]), (got, first)


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
@pytest.mark.parametrize("damage", ["magic", "truncated-bin"])
def test_damaged_dataset_is_one_line_on_every_rank(tmp_path, damage):
    from megatron.flexsp.data.indexed import write_documents

    prefix = str(tmp_path / "corpus")
    rng = np.random.default_rng(0)
    write_documents(prefix, [rng.integers(1, 250, size=int(n)) for n in rng.integers(20, 200, size=64)], np.uint16)
    if damage == "magic":
        with open(prefix + ".idx", "r+b") as fh:
            fh.write(b"NOTMEGAT")
        want = "corpus.idx: bad magic"
    else:
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 100)
        want = "corpus.bin: "
    args = [a for a in BASE if a != "--mock-data"] + [
        "--data-path",
        prefix,
        "--tokenizer-type",
        "ByteTokenizer",
        "--train-iters",
        "2",
    ]
    rc = _run(args, tmp_path / "c.log", timeout=120)
    log = (tmp_path / "c.log").read_text()
    assert rc != 0, log[-3000:]
    errors = [x for x in log.splitlines() if x.startswith("pretrain_gpt_flexsp.py: error: data: ")]
    assert len(errors) == 2 and all(want in x for x in errors), log[-3000:]  # one line from each rank
    if damage == "truncated-bin":
        assert "the .bin is truncated (document 63 onwards is missing)" in errors[0]
    assert "AssertionError" not in log and "bad header, cannot read" not in log, log[-3000:]


OLD_CKPT = Path(__file__).resolve().parent / "data" / "old_format_ckpt"


def test_checkpoint_written_before_the_state_registry_resumes_exactly(tmp_path):
    """A checkpoint the code before the state registry wrote (d7fa2ab, committed as test data) resumes
    with the same losses, bit for bit, as that run's own uninterrupted continuation; the sampler,
    planner and calibration states it carried are restored (the final checkpoint counts them on)."""
    import shutil

    import torch

    want = json.loads((OLD_CKPT / "expected.json").read_text())
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    shutil.copytree(OLD_CKPT, ckpt, ignore=shutil.ignore_patterns("expected.json"))
    cal = tmp_path / "calibrated.json"
    args = want["args"] + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval", "3"]
    # written untied with the unpadded byte vocabulary, before issue 18 made Megatron's defaults the trainer's
    args += ["--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "1"]
    args += ["--flexsp-save-calibrated", str(cal)]
    rc = _run(args + ["--metrics-file", str(metrics)], tmp_path / "r.log")
    log = (tmp_path / "r.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"resumed from {ckpt / 'iter_0000003'} at iteration 3" in log, log[-3000:]
    got = _losses(metrics)
    assert {str(k): v for k, v in got.items()} == want["continuation_losses"], (got, want["continuation_losses"])
    final = torch.load(ckpt / "iter_0000006" / "trainer.pt", map_location="cpu", weights_only=False)
    state = want["final_state"]
    assert final["extra"]["calibration"]["seen"] == state["calibration_seen"]
    assert final["planner"]["counters"]["inline"] == state["planner_inline"]
    assert final["sampler"]["next_batch"] == state["sampler_next_batch"]
    # what the registry adds: megatron's RNG tracker (seeded on CPU by the patches), and no dead planner config;
    # the continuation writes the torch_dist format (the default): each rank's RNG in its own file
    rngs = [torch.load(f, weights_only=False)["rng"] for f in sorted((ckpt / "iter_0000006").glob("rank_*.pt"))]
    assert len(rngs) == 2 and all("tracker" in r for r in rngs) and "config" not in final["planner"]
    assert "rng" not in final and json.loads((ckpt / "iter_0000006" / "meta.json").read_text())["format_version"] == 3
    assert json.loads(cal.read_text())["calibration"]
