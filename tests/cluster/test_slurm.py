"""The SLURM job scripts on a real single-node SLURM cluster (slurmctld + slurmd on localhost).

Slow (run by `pytest -m slow`): installs Debian's slurm-wlm and munge when missing (root
only), starts the cluster of scripts/slurm/local_cluster.sh in a temporary directory, submits
jobs with sbatch and checks each job's final state (scontrol / jobcomp record) and log.
Without root or apt the tests skip, unless FLEXSP_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.flexsp.launching import free_port, kill_tree
from tests.torchrun_utils import as_flags

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LC = ROOT / "scripts" / "slurm" / "local_cluster.sh"


def _unavailable(why: str):
    if os.environ.get("FLEXSP_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM test cluster required (FLEXSP_REQUIRE_SLURM=1) but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable("not root: slurmd and munged need root here")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _unavailable("slurm-wlm is not installed and apt-get is missing")
    r = subprocess.run(["bash", str(LC), "install"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        _unavailable(f"installing slurm-wlm/munge failed: {r.stderr[-2000:]}")
    d = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(LC), "start", str(d)], capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, f"local cluster did not start:\n{r.stdout}\n{r.stderr}"
        yield d
    finally:
        subprocess.run(["bash", str(LC), "stop", str(d)], capture_output=True, timeout=60)


def submit(cluster: Path, script: Path, *sbatch_args: str, env: dict | None = None, wait_s: int = 300):
    """sbatch + bounded wait through local_cluster.sh; returns (rc, final state line, log text)."""
    e = dict(
        os.environ,
        FLEXSP_PYTHON=sys.executable,
        FLEXSP_SLURM_WAIT_S=str(wait_s),
        MASTER_PORT=str(free_port()),
        FLEXSP_RUN_DIR=str(cluster / "runs"),
    )
    e.update(env or {})
    r = subprocess.run(
        ["bash", str(LC), "run", str(cluster), str(script), *sbatch_args],
        capture_output=True,
        text=True,
        timeout=wait_s + 60,
        env=e,
        cwd=ROOT,
    )
    state = re.search(r"^JobId=(\d+) JobState=(\S+) ExitCode=(\S+)$", r.stdout, re.M)
    assert state, f"no final job state in:\n{r.stdout}\n{r.stderr}"
    return r.returncode, (state.group(2), state.group(3)), r.stdout


def test_job_exit_states_are_reported(cluster, tmp_path):
    ok = tmp_path / "ok.sbatch"
    ok.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2 --time=00:02:00\nsrun bash -c 'echo task=$SLURM_PROCID/$SLURM_NTASKS'\n"
    )
    rc, state, log = submit(cluster, ok, wait_s=120)
    assert (rc, state) == (0, ("COMPLETED", "0:0")), log
    assert sorted(re.findall(r"task=(\d)/2", log)) == ["0", "1"]

    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\n#SBATCH --ntasks=1 --time=00:02:00\necho about-to-fail\nexit 3\n")
    rc, state, log = submit(cluster, bad, wait_s=120)
    assert rc != 0 and state == ("FAILED", "3:0"), log
    assert "about-to-fail" in log


def test_job_outside_allocation_is_refused():
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/slurm/train_flexsp.sbatch")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
    )
    assert r.returncode == 2 and "not inside a SLURM allocation" in r.stderr


@pytest.mark.parametrize("launcher,args", [("torchrun", ()), ("srun", ("--ntasks-per-node=4", "--cpus-per-task=1"))])
def test_cpu_job_launches_four_ranks(cluster, launcher, args):
    rc, state, log = submit(
        cluster,
        ROOT / "scripts/slurm/cpu_train.sbatch",
        *args,
        env={"FLEXSP_LAUNCHER": launcher, "FLEXSP_ENTRY": "scripts/slurm/dist_check.py"},
    )
    assert (rc, state) == (0, ("COMPLETED", "0:0")), log
    ranks = sorted(int(m) for m in re.findall(r"dist_check: rank (\d+)/4 .*? OK", log))
    assert ranks == [0, 1, 2, 3], log


@pytest.mark.parametrize(
    "mode,launcher,args",
    [("flexsp", "torchrun", ()), ("batch-adaptive", "srun", ("--ntasks-per-node=4", "--cpus-per-task=1"))],
)
def test_cpu_training_job(cluster, mode, launcher, args):
    run_dir = cluster / f"train-{mode}"
    rc, state, log = submit(
        cluster,
        ROOT / "scripts/slurm/cpu_train.sbatch",
        *args,
        wait_s=600,
        env={"SP_MODE": mode, "FLEXSP_RUN_DIR": str(run_dir), "TRAIN_ITERS": "2", "FLEXSP_LAUNCHER": launcher},
    )
    assert (rc, state) == (0, ("COMPLETED", "0:0")), log
    rows = [json.loads(x) for x in (run_dir / f"metrics-{mode}.jsonl").read_text().splitlines() if x.strip()]
    assert [r["iteration"] for r in rows] == [1, 2], rows
    assert all(r["sp_mode"] == mode and math.isfinite(r["loss"]) for r in rows), rows


def test_cpu_profile_job(cluster):
    from megatron.flexsp.planner.costmodel import CostModel

    run_dir = cluster / "profile"
    rc, state, log = submit(
        cluster,
        ROOT / "scripts/slurm/cpu_profile.sbatch",
        "--",
        *as_flags(profile_repeats=1, profile_warmup=1, profile_a2a_repeats=1),
        wait_s=600,
        env={"FLEXSP_RUN_DIR": str(run_dir), "SEQ_LENGTH": "512", "CAPACITY_TOKENS": "128"},
    )
    assert (rc, state) == (0, ("COMPLETED", "0:0")), log
    assert "fit error rms" in log
    cost = CostModel.from_dict(json.loads((run_dir / "cost_model.json").read_text()))
    assert cost.gpus_per_node == 4 and sorted(cost.alltoall.bandwidth_gbs) == [2, 4]
    assert cost.tokens_per_gpu == 128 and cost.smallest_degree(512, 4) == 4


def _dry_run(cluster, script, *args, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(
        SLURM_CONF=str(cluster / "slurm.conf"),
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(ROOT),
        FLEXSP_DRY_RUN="1",
        FLEXSP_PYTHON=sys.executable,
        FLEXSP_RUN_DIR=str(cluster / "dry"),
    )
    e.update(env)
    return subprocess.run(
        ["bash", str(ROOT / "scripts/slurm" / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=e,
        cwd=ROOT,
    )


def test_gpu_job_scripts_launch_lines(cluster):
    """The multi-node GPU scripts' launch lines (printed, not run: no GPUs here) and their trainer flags."""
    from megatron.flexsp.training.arguments import parse_args

    for script, mode in [
        ("train_flexsp.sbatch", "flexsp"),
        ("train_static.sbatch", "static"),
        ("train_batch_adaptive.sbatch", "batch-adaptive"),
        ("train_megatron_hybrid_cp.sbatch", "megatron-hybrid-cp"),
    ]:
        r = _dry_run(cluster, script, "--train-iters", "5", COST_MODEL="/x/cost.json")
        assert r.returncode == 0, r.stderr
        line = [x for x in r.stdout.splitlines() if x.startswith("flexsp-slurm: dry run: srun")]
        assert len(line) == 1, r.stdout
        argv = shlex.split(line[0].split(": dry run: ", 1)[1])
        i = argv.index("torch.distributed.run")
        assert argv[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
        assert "--nnodes=2" in argv and "--nproc-per-node=8" in argv and "--rdzv-backend=c10d" in argv
        assert "--rdzv-endpoint=gpu01:20077" in argv and "--rdzv-id=77" in argv
        args = parse_args(argv[argv.index(str(ROOT / "pretrain_gpt_flexsp.py")) + 1 :])
        assert args.sp_mode == mode and args.train_iters == 5 and args.flexsp_cost_model == "/x/cost.json"
        assert args.bf16 and args.transformer_impl == "transformer_engine" and args.distributed_backend == "nccl"
        assert args.num_layers == 32 and args.seq_length == 65536 and i > 0
        # checkpoints in the run directory (a requeued job resumes), save-and-exit on the time-limit signal
        ckpt = str(cluster / "dry" / "checkpoints" / mode)
        assert args.save == ckpt and args.load == ckpt and args.exit_signal_handler and args.exit_signal == "SIGUSR1"
        assert "--max-restarts=0" in argv and "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in argv
        head = (ROOT / "scripts/slurm" / script).read_text()
        assert "#SBATCH --signal=B:USR1@90\n" in head and "#SBATCH --requeue\n" in head
    # a Megatron blend in DATA_PATH reaches the trainer as separate weight/prefix arguments
    r = _dry_run(
        cluster,
        "train_static.sbatch",
        COST_MODEL="/x/cost.json",
        DATA_PATH="0.3 /d/a 0.7 /d/b",
        TOKENIZER_MODEL="/tok",
        CONTEXT_PARALLEL_SIZE="8",
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("flexsp-slurm: dry run: srun")][0]
    argv = shlex.split(line.split(": dry run: ", 1)[1])
    args = parse_args(argv[argv.index(str(ROOT / "pretrain_gpt_flexsp.py")) + 1 :])
    assert args.data_path == ["0.3", "/d/a", "0.7", "/d/b"] and args.tokenizer_model == "/tok"
    assert args.split == "99,1,0" and args.context_parallel_size == 8 and not args.mock_data
    # one task per GPU: 16 ranks, the trainer sees torchrun's variables
    r = _dry_run(
        cluster,
        "train_flexsp.sbatch",
        COST_MODEL="/x/cost.json",
        FLEXSP_LAUNCHER="srun",
        SLURM_NTASKS="16",
        SLURM_NTASKS_PER_NODE="8",
    )
    assert r.returncode == 0 and "srun --ntasks=16 --kill-on-bad-exit=1 bash -c" in r.stdout, r.stdout + r.stderr
    assert "RANK=$SLURM_PROCID" in r.stdout
    # the GPU preset has no default cost model: the trainer starts from its analytic prior, and says so
    r = _dry_run(cluster, "train_flexsp.sbatch")
    assert r.returncode == 0 and "no COST_MODEL" in r.stdout and "--flexsp-cost-model" not in r.stdout, r.stdout


def test_cpu_compare_job(cluster):
    run_dir = cluster / "compare"
    rc, state, log = submit(
        cluster,
        ROOT / "scripts/slurm/cpu_compare.sbatch",
        wait_s=900,
        env={"FLEXSP_COMPARE_MODES": "static megatron-hybrid-cp", "FLEXSP_RUN_DIR": str(run_dir), "TRAIN_ITERS": "2"},
    )
    assert (rc, state) == (0, ("COMPLETED", "0:0")), log
    table = (run_dir / "compare_table.txt").read_text()
    assert "static" in table and "megatron-hybrid-cp" in table, table
    losses = {}
    for mode in ("static", "megatron-hybrid-cp"):
        rows = [json.loads(x) for x in (run_dir / f"metrics-{mode}.jsonl").read_text().splitlines() if x.strip()]
        assert len(rows) == 2
        losses[mode] = [r["loss"] for r in rows]
    # same data, same weights, exact loss: the schedule differs, the losses do not
    assert losses["static"] == pytest.approx(losses["megatron-hybrid-cp"], rel=1e-4), losses


# --------------------------------------------------------------------------- no SLURM needed
# These run the job scripts with stand-ins for srun (runs the step's command on this host, as one
# task) and scontrol (records requeue requests), so the shell logic is tested without a cluster.

_FAKE_SRUN = """#!/bin/bash
while [[ ${1:-} == --* ]]; do shift; done   # srun's own options
exec "$@"
"""
_FAKE_SCONTROL = """#!/bin/bash
case "$1 ${2:-}" in
  "show hostnames") echo localhost ;;
  "requeue "*) echo "requeue $2" >> "$FAKE_SCONTROL_LOG" ;;
esac
"""
# Stands in for the trainer: saves (writes a marker) and exits 0 on SIGUSR1.
_ENTRY = """import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
print("entry: ready rank", os.environ.get("RANK"), flush=True)
end = time.monotonic() + 60
while not got and time.monotonic() < end:
    time.sleep(0.05)
open(sys.argv[1], "w").write("saved" if got else "timeout")
sys.exit(0 if got else 3)
"""


def _fake_slurm(tmp_path: Path, **env: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FLEXSP_", "PET_"))}
    e.update(
        PATH=f"{bin_dir}:{e['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        FLEXSP_PYTHON=sys.executable,
        FLEXSP_RUN_DIR=str(tmp_path / "run"),
        FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        GPUS_PER_NODE="1",
    )
    e.update(env)
    return e


def _launch_argv(stdout: str) -> list[str]:
    line = [x for x in stdout.splitlines() if x.startswith("flexsp-slurm: dry run: srun")]
    assert len(line) == 1, stdout
    return shlex.split(line[0].split(": dry run: ", 1)[1])


def test_launch_lines_checkpoints_restarts_and_signal(tmp_path):
    from megatron.flexsp.training.arguments import parse_args

    def dry(name: str, **env: str) -> subprocess.CompletedProcess:
        (tmp_path / name).mkdir()
        return subprocess.run(
            ["bash", str(ROOT / "scripts/slurm/cpu_train.sbatch")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=_fake_slurm(tmp_path / name, FLEXSP_DRY_RUN="1", **env),
        )

    r = dry("0")
    assert r.returncode == 0, r.stderr
    argv = _launch_argv(r.stdout)
    assert "--max-restarts=0" in argv and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=80" in argv
    args = parse_args(argv[argv.index(str(ROOT / "pretrain_gpt_flexsp.py")) + 1 :])
    ckpt = str(tmp_path / "0" / "run" / "checkpoints" / "flexsp")
    assert (args.save, args.load, args.exit_signal_handler, args.exit_signal) == (ckpt, ckpt, True, "SIGUSR1")
    assert args.save_interval is None
    r = dry("3", MAX_RESTARTS="2", SAVE_INTERVAL="50", CHECKPOINT_DIR="/ck")
    argv = _launch_argv(r.stdout)
    args = parse_args(argv[argv.index(str(ROOT / "pretrain_gpt_flexsp.py")) + 1 :])
    assert "--max-restarts=2" in argv and (args.save, args.load, args.save_interval) == ("/ck/flexsp", "/ck/flexsp", 50)
    r = dry("2", CHECKPOINT_DIR="none", SP_MODE="static")
    argv = _launch_argv(r.stdout)
    args = parse_args(argv[argv.index(str(ROOT / "pretrain_gpt_flexsp.py")) + 1 :])
    assert args.save is None and args.load is None and "--exit-signal" not in argv
    r = dry("1", MAX_RESTARTS="x")
    assert r.returncode == 2 and "MAX_RESTARTS must be a non-negative integer" in r.stderr
    # FLEXSP_ENTRY is one quoted word: a path with a space survives
    r = dry("4", FLEXSP_ENTRY="/a dir/prog.py", FLEXSP_LAUNCHER="srun")
    assert r.returncode == 0 and _launch_argv(r.stdout)[-1] == "/a dir/prog.py", r.stdout


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_time_limit_signal_is_forwarded_then_the_job_requeued(tmp_path, launcher):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@90 sends) reaches the ranks (through srun, and
    torchrun's agent), which save and exit; the job asks to be requeued and the script exits 0."""
    import signal
    import time

    entry = tmp_path / "entry.py"
    entry.write_text(_ENTRY)
    marker = tmp_path / "marker"
    env = _fake_slurm(tmp_path, FLEXSP_ENTRY=str(entry), FLEXSP_LAUNCHER=launcher)
    p = subprocess.Popen(
        ["bash", str(ROOT / "scripts/slurm/cpu_train.sbatch"), str(marker)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        end = time.monotonic() + 90
        while time.monotonic() < end:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("entry: ready"):
                break
        assert lines and lines[-1].startswith("entry: ready"), "".join(lines)
        time.sleep(0.5)
        p.send_signal(signal.SIGUSR1)  # the batch shell only
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            kill_tree(p)
    log = "".join(lines) + out
    assert p.returncode == 0, log
    assert marker.read_text() == "saved", log
    assert "asking the ranks to save a checkpoint and exit" in log and "requeueing job 4242" in log, log
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
