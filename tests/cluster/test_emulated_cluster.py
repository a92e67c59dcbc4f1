"""scripts/emulated_cluster.sh: a 2-node x 2-rank training in network namespaces matches one host.

The emulated cluster only changes where the ranks run and how fast their links are, never the
math: the per-iteration losses of a tiny FlexSP training on 2 namespace "nodes" (tc-shaped link
between them) must equal those of the same run with 4 ranks on one host (independent reference).
The slow test needs root and iproute2; it is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.flexsp.launching import torchrun_command
from tests.torchrun_utils import tiny_gpt

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "emulated_cluster.sh"
TRAIN = tiny_gpt(
    64,
    2048,
    global_batch_size=8,
    train_iters=2,
    lr="2e-3",
    lr_warmup_iters=1,
    seed=7,
    mock_data=True,
    mock_data_num_docs=200,
    no_progress_bar=True,
    log_interval=1,
    sp_mode="flexsp",
    flexsp_plan_ahead=0,
)


def _losses(path: Path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["iteration"])]


def _emulation_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) not installed"
    r = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"emulated_cluster.sh --check failed: {r.stderr.strip() or r.stdout.strip()}"
    return None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "0"], "--nodes must be a positive integer, got '0'"),
        (["--link-mbit", "fast"], "--link-mbit must be a positive integer, got 'fast'"),
        (["--latency-ms", "-1"], "--latency-ms must be a number >= 0, got '-1'"),
    ],
)
def test_bad_options_are_named(argv, message):
    r = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert message in r.stderr


@pytest.mark.slow
def test_two_nodes_match_one_host(tmp_path):
    why = _emulation_unavailable()
    if why:
        pytest.skip(f"cannot emulate nodes here: {why}")
    env = dict(os.environ, PYTHON=sys.executable)
    emu_metrics = tmp_path / "emulated.jsonl"
    r = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--link-mbit",
            "200",
            "--timeout",
            "400",
            "--",
            *TRAIN,
            "--metrics-file",
            str(emu_metrics),
        ],
        capture_output=True,
        text=True,
        timeout=480,
        env=env,
        cwd=ROOT,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "[node0]" in out and "[node1]" in out, out[-4000:]
    assert "emulated cluster: 2 nodes x 2 ranks" in out
    # this run's namespaces are gone afterwards
    prefix = re.search(r"namespaces (fx\d+-)\*", out).group(1)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert not [line for line in left.splitlines() if line.startswith(prefix)], left

    host_metrics = tmp_path / "host.jsonl"
    r = subprocess.run(
        [
            *torchrun_command(4),
            "pretrain_gpt_flexsp.py",
            *TRAIN,
            "--metrics-file",
            str(host_metrics),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    emu, host = _losses(emu_metrics), _losses(host_metrics)
    assert len(emu) == len(host) == 2
    assert emu == pytest.approx(host, rel=1e-5, abs=1e-6)
