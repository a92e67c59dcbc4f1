"""scripts/device_check.sh: without a GPU it stops with a clear message (exit 3); its attention
harness (FlexSPCoreAttention at degree 1 on packed documents, error measure, missing packages)
is checked on CPU against a naive per-document attention; its report is written stage by stage,
and no stage process outlives its limit, the script's time limit, or a signal to the script."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import device_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU path does not apply")
def test_no_gpu_is_a_clear_stop(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/device_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out")),
        cwd=ROOT,
    )
    assert r.returncode == device_check.NO_GPU_EXIT == 3
    assert "no NVIDIA GPU" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was run or written


def naive(q, k, v, bounds):
    """Causal softmax attention per document, GQA by repeating kv heads; [T, h, d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [h, L, d]
        s = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        mask = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)
        outs.append((s.masked_fill(mask, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def test_attention_harness_matches_naive_reference():
    from flexsp_patches import cpu_compat

    cpu_compat.apply(force_cpu=True)  # CPU tensors here, also on a machine with a GPU
    lengths = [1, 5, 23, 9]
    bounds = [0, 1, 6, 29, 38]
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(38, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    cu = torch.tensor(bounds, dtype=torch.int32)
    out, dq, dk, dv = device_check.attention_run("sdpa", q, k, v, cu, max(lengths), go)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref = naive(qq, kk, vv, bounds)
    ref.backward(go)
    assert device_check.max_err(out, ref.detach()) < 1e-10
    for a, b in zip((dq, dk, dv), (qq.grad, kk.grad, vv.grad)):
        assert device_check.max_err(a, b) < 1e-10
    # a wrong result is caught by the same measure
    assert device_check.max_err(out + 0.01 * out.abs().max(), ref.detach()) > 5e-3


def test_attention_check_statuses_and_report():
    r = device_check.attention_check("sdpa", device="cpu", doc_lengths=(3, 40, 7), heads=4, kv_heads=2, dim=16)
    # bf16 SDPA against itself: the kernel's error equals the budget's, so it passes
    assert r.status == "pass" and r.fwd_err == pytest.approx(r.fwd_ref_err) and 0 < r.fwd_ref_err < 0.05
    missing = device_check.attention_check("flash", device="cpu")
    if missing.status == "not installed":
        assert "flash-attn" in missing.detail
    assert device_check.passes(0.01, 0.006) and not device_check.passes(0.02, 0.006)
    assert not device_check.passes(float("nan"), 0.006)
    text = device_check.format_report(
        [r, missing],
        ("pass", "compute fit ..."),
        [device_check.TrainResult("sdpa", "pass", [5.6, 5.1], 1000.0, 12.0)],
        "cpu",
    )
    assert "sdpa" in text and "5.6000" in text and "profiler: pass" in text


# ------------------------------------------------------------ reports and processes (issue 10 item 8)
def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids, within_s: float = 5.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def test_report_is_written_after_every_stage(tmp_path):
    rep = device_check.Report(tmp_path, "cpu")
    rep.attn.append(device_check.AttentionResult("sdpa", "pass", 1e-3, 1e-3, 2e-3, 2e-3, 1.0))
    rep.stage_done("attention-sdpa", rep.attn[-1])
    first = json.loads((tmp_path / "device_check.json").read_text())
    assert first["complete"] is False and [a["backend"] for a in first["attention"]] == ["sdpa"]
    assert "(incomplete" in (tmp_path / "device_check.txt").read_text()
    rep.prof = ("FAIL", "fit_linear needs two distinct points")
    rep.stage_done("profile", rep.prof)
    lines = [json.loads(x) for x in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == ["attention-sdpa", "profile"]
    assert lines[1]["result"][0] == "FAIL" and rep.failed() == ["profiler"]
    assert json.loads((tmp_path / "device_check.json").read_text())["profile"][0] == "FAIL"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_stage_past_its_limit_is_killed_with_its_children(tmp_path):
    info = tmp_path / "info"
    child = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '300'])\n"
        "open(sys.argv[1], 'w').write(f'{os.getpid()} {os.getsid(0)} {os.getpgid(0)} {p.pid}')\n"
        "p.wait()\n"
    )
    t0 = time.monotonic()
    rc, tail = device_check._run([sys.executable, "-c", child, str(info)], tmp_path / "stage.log", timeout=3)
    pid, sid, pgid, grandchild = (int(x) for x in info.read_text().split())
    try:
        assert rc == 124 and "timed out after 3s" in tail
        assert time.monotonic() - t0 < 10
        # no new session or group: an outer `timeout` (which signals its process group) reaches it
        assert (sid, pgid) == (os.getsid(0), os.getpgid(0))
        assert _gone([pid, grandchild]), "the stage or its child outlived the stage limit"
    finally:
        _kill([grandchild])


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: a stage child that ignores SIGTERM, then waits
bash -c 'trap "" TERM; exec sleep 300' &
echo "$$ $!" > "$FAKE_PIDS"
wait
"""


def _fake_run(tmp_path, limit_s: str):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    pids = tmp_path / "pids"
    env = dict(os.environ, PYTHON=str(fake), FAKE_PIDS=str(pids), DEVICE_CHECK_TIMEOUT_S=limit_s)
    p = subprocess.Popen(
        ["bash", str(ROOT / "scripts/device_check.sh")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < end:
        time.sleep(0.05)
    return p, [int(x) for x in pids.read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_time_limit_ends_every_stage_process(tmp_path):
    p, pids = _fake_run(tmp_path, "2")
    try:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 124 and "stopped after 2s" in err
        assert _gone(pids), "a stage process that ignores SIGTERM outlived device_check.sh"
    finally:
        p.kill()
        _kill(pids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_terminating_the_script_ends_every_stage_process(tmp_path):
    p, pids = _fake_run(tmp_path, "120")
    try:
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 143 and "stopped by SIGTERM" in err
        assert time.monotonic() - t0 < 15
        assert _gone(pids)
    finally:
        p.kill()
        _kill(pids)


def test_cpu_run_of_main_writes_a_complete_report(tmp_path, capsys):
    rc = device_check.main(
        ["--device", "cpu", "--skip-profile", "--skip-train", "--out", str(tmp_path), "--doc-lengths", "3,40,7"]
    )
    res = json.loads((tmp_path / "device_check.json").read_text())
    stages = [json.loads(x)["stage"] for x in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert stages == ["attention-sdpa", "attention-flash", "attention-te", "attention-matrix", "te-rebuild"]
    assert res["complete"] is True and res["attention"][0]["status"] == "pass"
    statuses = {a["backend"]: a["status"] for a in res["attention"]}
    assert rc == (0 if all(s in ("pass", "not installed") for s in statuses.values()) else 1), statuses
    assert "attention vs SDPA" in capsys.readouterr().out


# ------------------------------------------------------------ scripts/setup_gpu.sh (issue 10 item 4)
def _setup_gpu(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts/setup_gpu.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHON=python),
        cwd=ROOT,
    )


def test_setup_gpu_installs_the_documented_way():
    """Dry run: TE and flash-attn with --no-build-isolation (their documented procedure), every pip
    call pinned to the installed torch, this package without its dependencies, flash-attn inside
    the range TE 2.10-2.12 accept (>= 2.1.1, <= 2.8.3)."""
    import torch

    r = _setup_gpu("--dry-run")
    assert r.returncode == 0, r.stderr
    cmds = [x for x in r.stdout.splitlines() if x.startswith("+ ")]
    assert cmds and all(" -m pip install -c " in c for c in cmds)
    te = [c for c in cmds if "transformer_engine" in c]
    fa = [c for c in cmds if "flash-attn" in c]
    assert len(te) == 1 and "--no-build-isolation" in te[0] and "pytorch" in te[0]
    assert len(fa) == 1 and "--no-build-isolation" in fa[0]
    version = fa[0].split("flash-attn==")[1].split()[0]
    parts = tuple(int(x) for x in version.split("."))
    assert (2, 1, 1) <= parts <= (2, 8, 3), version
    assert any("--no-deps -e ." in c for c in cmds)
    if torch.version.cuda is None:
        assert "CPU build" in r.stdout
    skipped = _setup_gpu("--dry-run", "--no-te", "--no-flash")
    assert skipped.returncode == 0 and "transformer_engine" not in skipped.stdout and "flash-attn" not in skipped.stdout


def test_setup_gpu_needs_torch_first():
    r = _setup_gpu(python="/bin/false")
    assert r.returncode == 2 and "install a CUDA build of torch first" in r.stderr
    bad = _setup_gpu("--frobnicate")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_a_signal_during_an_in_process_stage_stops_the_run(tmp_path, monkeypatch):
    """The attention stage catches kernel errors (Exception); a TERM must still end the run,
    with the stages finished so far in the report."""
    real = device_check.attention_check
    calls = []

    def check(backend, **kw):
        calls.append(backend)
        if backend == "flash":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the stage, like the outer timeout's
            time.sleep(5)  # interrupted by the handler long before this ends
        return real(backend, **kw)

    monkeypatch.setattr(device_check, "attention_check", check)
    saved = {sig: signal.getsignal(sig) for sig in device_check._STOP_SIGNALS}  # main leaves them ignored
    try:
        rc = device_check.main(
            ["--device", "cpu", "--skip-profile", "--skip-train", "--out", str(tmp_path), "--doc-lengths", "3,9"]
        )
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert rc == 128 + signal.SIGTERM
    assert calls == ["sdpa", "flash"]  # te never started
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["complete"] is False and [a["backend"] for a in res["attention"]] == ["sdpa"]
    assert "interrupted by SIGTERM" in res["notes"][0]


def test_stages_without_time_left_are_skipped_not_started(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(device_check, "_run", lambda cmd, log, timeout: started.append(cmd) or (0, ""))
    rc = device_check.main(["--device", "cpu", "--budget-s", "1", "--out", str(tmp_path), "--doc-lengths", "3,9"])
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 0 and res["complete"] is True and not started
    assert res["profile"][0] == "skipped" and [t["status"] for t in res["train"]] == ["skipped"] * 3
    assert "skipped" in (tmp_path / "device_check.txt").read_text()


# ------------------------------------------------------------ issue 17 item 7: every stage, one table
GPU_STAGES = [
    "attention-matrix",
    "te-rebuild",
    "profile",
    "train-sdpa",
    "train-flash",
    "train-te",
    "fsdp2-vs-ddp",
    "recompute",
]


def test_cpu_run_end_to_end_names_every_skipped_gpu_stage(tmp_path, capsys):
    """No flags but --device cpu: the CPU check runs, every GPU stage is listed as skipped with why."""
    rc = device_check.main(["--device", "cpu", "--out", str(tmp_path), "--doc-lengths", "3,40,7"])
    res = json.loads((tmp_path / "device_check.json").read_text())
    rows = {r["stage"]: r for r in res["stages"]}
    assert list(rows) == ["attention-sdpa", "attention-flash", "attention-te", *GPU_STAGES]
    assert rows["attention-sdpa"]["status"] == "pass"
    for name in GPU_STAGES:
        assert rows[name]["status"] == "skipped" and "CUDA GPU" in rows[name]["detail"], rows[name]
    assert res["complete"] is True and rc in (0, 1)
    table = capsys.readouterr().out
    assert "stages" in table and all(name in table for name in GPU_STAGES)


def test_a_stage_past_its_limit_is_timeout_not_fail_or_skipped(tmp_path, monkeypatch):
    """A subprocess stage stopped at its time limit reads TIMEOUT in the table; the exit code says so."""
    from megatron.flexsp.launching import TIMED_OUT

    monkeypatch.setattr(device_check, "_run", lambda cmd, log, timeout: (TIMED_OUT, "timed out after 3s"))
    assert device_check._status(TIMED_OUT) == "TIMEOUT" and device_check._status(1) == "FAIL"
    res = device_check.gpu_stage("te-rebuild", tmp_path, 3.0)
    assert res.status == "TIMEOUT"
    rep = device_check.Report(tmp_path, "cpu")
    rep.stage_done("te-rebuild", res)
    (tmp_path / "profile.log").write_text("")  # what the stopped profiler left
    rep.prof = device_check.profile_stage(tmp_path, 3.0)
    rep.stage_done("profile", rep.prof)
    assert rep.timed_out() == ["te-rebuild", "profile"] and rep.failed() == []
    assert "TIMEOUT" in (tmp_path / "device_check.txt").read_text()


def test_gpu_stage_reads_the_stage_result(tmp_path, monkeypatch):
    """A stage process's JSON (status, detail, rows) becomes the table row and its own rows."""

    def fake_run(cmd, log, timeout):
        result = Path(cmd[cmd.index("--result") + 1])
        result.write_text(json.dumps({"status": "skipped", "detail": "transformer-engine missing", "rows": []}))
        return 0, ""

    monkeypatch.setattr(device_check, "_run", fake_run)
    res = device_check.gpu_stage("te-rebuild", tmp_path, 10.0)
    assert (res.status, res.detail) == ("skipped", "transformer-engine missing")


def test_stage_script_skips_te_cleanly_when_missing(tmp_path):
    """device_check_stages.py te-rebuild without Transformer Engine: skipped, saying which package."""
    import device_check_stages

    if device_check.unavailable("te") == "":
        pytest.skip("Transformer Engine is installed here")
    rc = device_check_stages.main(["te-rebuild", "--result", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and res["status"] == "skipped" and "transformer-engine" in res["detail"]


def test_attention_matrix_logic_on_cpu():
    """The matrix's own code on tiny CPU documents: SDPA rows pass against math with math switched
    off (fp32 and bf16), fp32 flash/te rows are n/a, missing packages are skipped with why."""
    import device_check_stages

    res = device_check_stages.attention_matrix(device="cpu", docs_by_size={"tiny": (3, 40, 7)})
    rows = {(r["backend"], r["dtype"]): r for r in res["rows"]}
    assert len(rows) == 6
    assert rows[("sdpa", "float32")]["status"] == "pass" and rows[("sdpa", "float32")]["fwd_err"] < 1e-5
    assert rows[("sdpa", "bfloat16")]["status"] == "pass"
    assert rows[("flash", "float32")]["status"] == rows[("te", "float32")]["status"] == "n/a"
    for b in ("flash", "te"):
        if device_check.unavailable(b):
            assert rows[(b, "bfloat16")]["status"] == "skipped" and rows[(b, "bfloat16")]["detail"]
    assert res["status"] == "pass"


# ------------------------------------------------------------ issue 19: recomputation on the GPU
@pytest.mark.parametrize("shift, expected", [(0.0, "pass"), (0.5, "FAIL")])
def test_recompute_stage_needs_the_first_loss_of_the_run_without(tmp_path, monkeypatch, shift, expected):
    """Recomputing runs the same forward: a first loss off by more than 0.1% fails the stage."""
    calls = []

    def fake_train(backend, out, cost, timeout, iters, sharding="fsdp2", extra=(), label=""):
        calls.append((label, tuple(extra)))
        return device_check.TrainResult(f"sdpa-{label}", "pass", [5.6 + shift, 5.1], 1000.0, 13.0)

    monkeypatch.setattr(device_check, "train_stage", fake_train)
    rep = device_check.Report(tmp_path, "test GPU")
    rep.train = [device_check.TrainResult("sdpa", "pass", [5.6, 5.1], 1000.0, 10.0)]
    res = device_check._recompute_check(argparse.Namespace(train_iters=2), rep, "cost.json", lambda: 600.0)
    assert res.status == expected
    assert [c[0] for c in calls] == ["full", "selective"]
    assert ("--recompute-granularity", "full") == calls[0][1][:2] and "mlp" in calls[1][1]
    assert "1.30x" in res.detail
