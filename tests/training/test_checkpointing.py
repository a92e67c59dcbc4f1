"""Checkpoints: exact resume on FSDP2 (gloo), atomic save under a crash, clear errors on mismatch;
verified loads with fallback, safe unpickling, retention, kill-safe re-save, non-finite refusal."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from megatron.flexsp.training import checkpoint_writer as writer
from megatron.flexsp.training import checkpointing as ckpt

try:  # the trainer redesign moves the dataclass configs into configs.py
    from megatron.flexsp.training.configs import OptimizerConfig
except ImportError:  # pragma: no cover - before the move
    from megatron.flexsp.training.arguments import OptimizerConfig  # type: ignore[no-redef]
from megatron.flexsp.training.optimizer import build_optimizer, clip_grad_norm
from tests.dist_utils import run_distributed

# only what differs from OptimizerConfig's defaults (min_lr 0, beta1 0.9, eps 1e-8, clip 1.0, cosine)
CFG = OptimizerConfig(lr=0.05, weight_decay=0.1, adam_beta2=0.95, lr_warmup_iters=1, lr_decay_iters=6)


def _model(seed: int, hidden: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 3))


def _shard(m, world_size, fsdp=True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if world_size == 1:
        return m
    if not fsdp:  # replicated parameters, gradients all-reduced (the runtime's ddp mode)

        def hook(p):
            torch.distributed.all_reduce(p.grad)

        for p in m.parameters():
            p.register_post_accumulate_grad_hook(hook)
        return m
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    for mod in (m, m[0], m[2]):
        mod.set_gradient_divide_factor(1.0)
        mod.set_force_sum_reduction_for_comms(True)
    return m


def _step(m, opt, sched, it, rank, world_size):
    g = torch.Generator().manual_seed(100 + it)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    per = 8 // world_size
    sl = slice(rank * per, (rank + 1) * per)
    noise = torch.rand(()).item()  # consumes the torch RNG: resume must restore it
    loss = ((m(x[sl]) - y[sl]) ** 2).sum() / 8 * (1.0 + 0.0 * noise)
    loss.backward()
    clip_grad_norm(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()
    sched.set_for_next_step()
    t = loss.detach().clone()
    if world_size > 1:
        torch.distributed.all_reduce(t)
    return t.item(), noise


def _resume_body(rank, world_size, tmp, fsdp=True):
    m = _shard(_model(0), world_size, fsdp)
    opt, sched = build_optimizer(m, CFG)
    for it in range(2):
        _step(m, opt, sched, it, rank, world_size)
    ckpt.save_checkpoint(tmp, 2, m, opt, sched, states={"sampler": {"next_batch": 2}, "planner": {"p": 1}})
    straight = [_step(m, opt, sched, it, rank, world_size) for it in range(2, 5)]

    m2 = _shard(_model(7), world_size, fsdp)  # different init: everything must come from the checkpoint
    opt2, sched2 = build_optimizer(m2, CFG)
    torch.manual_seed(999)
    loaded = ckpt.load_checkpoint(tmp, m2, opt2, sched2)
    resumed = [_step(m2, opt2, sched2, it, rank, world_size) for it in range(2, 5)]

    errors = []
    bad = _shard(_model(0, hidden=12), world_size, fsdp)
    bopt, bsched = build_optimizer(bad, CFG)
    try:
        ckpt.load_checkpoint(tmp, bad, bopt, bsched)
    except ckpt.CheckpointError as e:
        errors.append(str(e))
    return (
        straight,
        resumed,
        loaded.iteration,
        loaded.states.get("sampler"),
        loaded.states.get("planner"),
        sched2.num_steps,
        errors,
    )


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "replicated"])
def test_resume_is_exact_and_mismatch_is_clear(tmp_path, fsdp):
    out = run_distributed(_resume_body, 2, str(tmp_path), fsdp, timeout=180)
    for straight, resumed, it, sampler, planner, steps, errors in out:
        assert resumed == straight  # bit-identical losses and RNG draws
        assert (it, sampler, planner, steps) == (2, {"next_batch": 2}, {"p": 1}, 5)
        assert len(errors) == 1 and "shape mismatch" in errors[0] and "0.weight" in errors[0]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    # a checkpoint of 2 ranks loads into 1 process (full state dicts), with a note that RNG stays seeded
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    loaded = ckpt.load_checkpoint(tmp_path, m, opt, sched)
    assert loaded.iteration == 2 and loaded.states["sampler"] == {"next_batch": 2}
    assert any("written by 2 ranks; this run has 1" in w for w in loaded.warnings)
    assert sched.num_steps == 2  # the scheduler is global: restored whatever the world size


def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    _step(m, opt, sched, 0, 0, 1)
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    _step(m, opt, sched, 1, 0, 1)

    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        if str(f).endswith("optim.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, m, opt, sched)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "iter_0000002").exists()
    m2 = _model(5)
    opt2, sched2 = build_optimizer(m2, CFG)
    assert ckpt.load_checkpoint(tmp_path, m2, opt2, sched2).iteration == 1
    for k, v in good.items():
        assert torch.equal(m2.state_dict()[k], v)
    # re-saving the same iteration replaces it atomically
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    assert ckpt.find_checkpoint(tmp_path).name == "iter_0000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_checkpoint_errors(tmp_path):
    m = _model(0)
    opt, sched = build_optimizer(m, CFG)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope", m, opt, sched)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint there"):
        ckpt.load_checkpoint(tmp_path, m, opt, sched)
    (tmp_path / "latest").write_text("iter_0000042\n")
    with pytest.raises(ckpt.CheckpointError, match="missing or incomplete"):
        ckpt.load_checkpoint(tmp_path, m, opt, sched)


# ------------------------------------------------------------------ verification, safety, retention


def _full_state(m) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()}


def _rewrite_checksums(d: Path) -> None:
    """What an attacker who edits a checkpoint would also do: make meta.json match the new files."""
    meta = json.loads((d / "meta.json").read_text())
    for name in meta["files"]:
        data = (d / name).read_bytes()
        meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "meta.json").write_text(json.dumps(meta))


class _Pwn:
    """A pickle reducer that would run a shell command when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _faults_body(rank, world_size, tmp):
    tmp = Path(tmp)
    m = _shard(_model(0), world_size)
    opt, sched = build_optimizer(m, CFG)
    out = {}

    # 1. a flipped byte in the newest model.pt: fall back to the previous checkpoint, with a warning
    a = tmp / "a"
    ref = {}
    for it in range(3):
        _step(m, opt, sched, it, rank, world_size)
        ckpt.save_checkpoint(a, it + 1, m, opt, sched, states={"sampler": {"next_batch": it + 1}})
        ref[it + 1] = _full_state(m)
    if rank == 0:
        f = a / "iter_0000003" / "model.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    torch.distributed.barrier()
    m2 = _shard(_model(7), world_size)
    opt2, sched2 = build_optimizer(m2, CFG)
    loaded = ckpt.load_checkpoint(a, m2, opt2, sched2)
    got = _full_state(m2)
    out["fallback"] = (
        loaded.iteration,
        loaded.path.name,
        loaded.fallback_from and loaded.fallback_from.name,
        loaded.warnings,
        loaded.states.get("sampler"),
        sched2.num_steps,
        rank != 0 or all(torch.equal(got[k], v) for k, v in ref[2].items()),
    )

    # 2. trainer.pt with an os.system reducer (checksums made to match): refused, nothing runs
    b = tmp / "b"
    ckpt.save_checkpoint(b, 1, m, opt, sched)
    marker = tmp / "pwned"
    if rank == 0:
        torch.save({"iteration": 1, "extra": _Pwn(str(marker))}, b / "iter_0000001" / "trainer.pt")
        _rewrite_checksums(b / "iter_0000001")
    torch.distributed.barrier()
    try:
        ckpt.load_checkpoint(b, m2, opt2, sched2)
        out["unsafe"] = None
    except ckpt.UnsafeCheckpointError as e:
        out["unsafe"] = str(e)
    out["pwned"] = marker.exists()

    # 3. keep_latest_k=2 leaves exactly the newest 2
    c = tmp / "c"
    for it in range(1, 6):
        ckpt.save_checkpoint(c, it, m, opt, sched, keep_latest_k=2)
    out["kept"] = sorted(p.name for p in c.iterdir())

    # 4. a non-finite value in one rank's shard only: refused on every rank, latest unchanged
    with torch.no_grad():
        w = m[2].weight
        local = w.to_local() if hasattr(w, "to_local") else w
        if rank == 1:
            local.view(-1)[0] = float("inf")
    try:
        ckpt.save_checkpoint(c, 6, m, opt, sched, keep_latest_k=2)
        out["nonfinite"] = None
    except ckpt.NonFiniteCheckpointError as e:
        out["nonfinite"] = str(e)
    out["latest_after_nonfinite"] = (c / "latest").read_text().strip()
    return out


def test_bitflip_fallback_unsafe_pickle_retention_nonfinite(tmp_path):
    out = run_distributed(_faults_body, 2, str(tmp_path), timeout=180)
    for r in out:
        it, name, bad, warns, sampler, steps, equal = r["fallback"]
        assert (it, name, bad, sampler, steps, equal) == (2, "iter_0000002", "iter_0000003", {"next_batch": 2}, 2, True)
        assert len(warns) == 1 and "iter_0000003" in warns[0] and "iter_0000002" in warns[0] and "sha256" in warns[0]
        assert r["unsafe"] is not None and "refused" in r["unsafe"] and "system" in r["unsafe"]
        assert "trainer.pt" in r["unsafe"]
        assert r["pwned"] is False
        assert r["kept"] == ["iter_0000004", "iter_0000005", "latest"]
        assert r["nonfinite"] is not None and "2.weight" in r["nonfinite"] and "non-finite" in r["nonfinite"]
        assert r["latest_after_nonfinite"] == "iter_0000005"
    assert not (tmp_path / "c" / "iter_0000006").exists()
    assert not (tmp_path / "pwned").exists()


def _one(seed: int = 0):
    m = _model(seed)
    opt, sched = build_optimizer(m, CFG)
    _step(m, opt, sched, 0, 0, 1)
    return m, opt, sched


class _Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so no cleanup code of the saver runs."""


def test_resave_killed_at_every_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    m, opt, sched = _one()
    old = {k: v.clone() for k, v in m.state_dict().items()}
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    _step(m, opt, sched, 1, 0, 1)
    new = {k: v.clone() for k, v in m.state_dict().items()}
    targets = [
        (os, "replace"),
        (os, "link"),
        (writer.shutil, "rmtree"),
        (writer, "_fsync_dir"),
        (writer, "_fsync_file"),
    ]
    real = {(mod, name): getattr(mod, name) for mod, name in targets}
    seen_both = set()
    n = 0
    while True:
        n += 1
        calls = [0]

        def make(fn, calls=calls, n=n):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == n:
                    raise _Killed()
                return fn(*a, **kw)

            return wrapped

        for (mod, name), fn in real.items():
            monkeypatch.setattr(mod, name, make(fn))
        try:
            ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
            finished = True
        except _Killed:
            finished = False
        for (mod, name), fn in real.items():
            monkeypatch.setattr(mod, name, fn)
        # after the kill, `latest` resolves to a complete checkpoint that verifies and loads: old or new
        path = ckpt.find_checkpoint(tmp_path)
        assert ckpt.verify_checkpoint(path) == []
        m2, opt2, sched2 = _one(5)
        loaded = ckpt.load_checkpoint(tmp_path, m2, opt2, sched2)
        state = m2.state_dict()
        is_old = all(torch.equal(state[k], v) for k, v in old.items())
        is_new = all(torch.equal(state[k], v) for k, v in new.items())
        assert loaded.iteration == 1 and (is_old or is_new), f"kill at step {n}"
        seen_both.add("new" if is_new else "old")
        # the next save recovers: one clean iteration directory, no leftovers
        ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"], f"kill at step {n}"
        assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
        # put the old content back for the next round
        m3, opt3, sched3 = _one()
        ckpt.save_checkpoint(tmp_path, 1, m3, opt3, sched3)
        if finished:
            break
        assert n < 100
    assert n > 8 and seen_both == {"old", "new"}


def test_load_step_fallback_chain_and_old_format(tmp_path):
    m, opt, sched = _one()
    for it in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, it, m, opt, sched, states={"sampler": {"next_batch": it}})
    m2, opt2, sched2 = _one(5)
    assert ckpt.load_checkpoint(tmp_path, m2, opt2, sched2, load_step=2).states["sampler"] == {"next_batch": 2}
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"--load-step 7: no complete checkpoint iter_0000007 "
        r"\(available iterations: \[1, 2, 3\]\)",
    ):
        ckpt.load_checkpoint(tmp_path, m2, opt2, sched2, load_step=7)
    # load_step names exactly one checkpoint: no fallback when it is damaged
    (tmp_path / "iter_0000002" / "optim.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000002: optim.pt has 7 bytes"):
        ckpt.load_checkpoint(tmp_path, m2, opt2, sched2, load_step=2)
    # newest truncated, next damaged: the oldest loads, the warning names the newest
    f = tmp_path / "iter_0000003" / "trainer.pt"
    f.write_bytes(f.read_bytes()[:-10])
    loaded = ckpt.load_checkpoint(tmp_path, m2, opt2, sched2)
    assert (loaded.iteration, loaded.fallback_from.name) == (1, "iter_0000003")
    assert "truncated" in loaded.warnings[0]
    # `latest` names a directory that is gone: the newest that verifies
    (tmp_path / "latest").write_text("iter_0000009\n")
    assert ckpt.load_checkpoint(tmp_path, m2, opt2, sched2).iteration == 1
    (tmp_path / "latest").write_text("iter_0000003\n")
    # nothing verifies: one error naming every failure
    (tmp_path / "iter_0000001" / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint verifies") as e:
        ckpt.load_checkpoint(tmp_path, m2, opt2, sched2)
    assert all(f"iter_000000{i}" in str(e.value) for i in (1, 2, 3))
    # format 1 (before checksums) still loads, noted as unverified
    d = tmp_path / "v1"
    ckpt.save_checkpoint(d, 4, m, opt, sched)
    meta = json.loads((d / "iter_0000004" / "meta.json").read_text())
    meta["format_version"] = 1
    del meta["files"]
    (d / "iter_0000004" / "meta.json").write_text(json.dumps(meta))
    loaded = ckpt.load_checkpoint(d, m2, opt2, sched2)
    assert loaded.iteration == 4 and "unverified" in loaded.warnings[0]


def test_nonfinite_optimizer_state_is_refused(tmp_path):
    m, opt, sched = _one()
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched)
    state = next(iter(opt.state.values()))
    state["exp_avg_sq"].view(-1)[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteCheckpointError, match=r"optimizer\.state\..*exp_avg_sq"):
        ckpt.save_checkpoint(tmp_path, 2, m, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]
    # the helper itself, against a hand-made reference
    assert ckpt.nonfinite_tensors(
        {
            "a": torch.ones(3),
            "b": {"c": torch.tensor([1.0, float("-inf")])},
            "d": [torch.zeros(2), torch.tensor([float("nan")])],
            "e": torch.tensor([1, 2]),
        }
    ) == ["b.c", "d[1]"]


def test_resume_compatibility():
    saved = {
        "global_batch_size": 8,
        "lr": 1e-3,
        "min_lr": 1e-5,
        "lr_warmup_iters": 10,
        "lr_decay_iters": 100,
        "lr_decay_style": "cosine",
        "seed": 1,
    }
    ckpt.check_resume_compatible(saved, dict(saved, seed=2, train_iters=5))  # other args may change
    ckpt.check_resume_compatible({}, saved)  # an old checkpoint without an args record
    with pytest.raises(
        ckpt.ResumeMismatchError,
        match=r"^the checkpoint was saved with --global-batch-size 8, "
        r"this run has 16: .*not supported",
    ) as e:
        ckpt.check_resume_compatible(saved, dict(saved, global_batch_size=16), override_opt_param_scheduler=True)
    assert "\n" not in str(e.value) and isinstance(e.value, ckpt.CheckpointError)
    changed = dict(saved, lr=2e-3, lr_decay_iters=200)
    with pytest.raises(
        ckpt.ResumeMismatchError,
        match=r"--lr 0.001 -> 0.002, --lr-decay-iters 100 -> 200.*"
        r"--override-opt-param-scheduler",
    ):
        ckpt.check_resume_compatible(saved, changed)
    ckpt.check_resume_compatible(saved, changed, override_opt_param_scheduler=True)
    import argparse

    ckpt.check_resume_compatible(saved, argparse.Namespace(**saved))


def test_load_checks_resume_args_before_loading(tmp_path):
    m, opt, sched = _one()
    args = {"global_batch_size": 8, "lr": 0.05, "lr_decay_style": "cosine"}
    ckpt.save_checkpoint(tmp_path, 1, m, opt, sched, args=args)
    m2, opt2, sched2 = _one(5)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ckpt.ResumeMismatchError, match="--lr-decay-style cosine -> linear"):
        ckpt.load_checkpoint(tmp_path, m2, opt2, sched2, args=dict(args, lr_decay_style="linear"))
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in before.items())  # nothing was loaded
    loaded = ckpt.load_checkpoint(
        tmp_path, m2, opt2, sched2, args=dict(args, lr_decay_style="linear"), override_opt_param_scheduler=True
    )
    assert loaded.args == args and loaded.fallback_from is None and loaded.warnings == []
