"""Recomputation modes in the profile: activation memory per token, compute and all-to-all factors per mode.

Why measured: the planner trades memory for time per SP group (contract C4's optional
``"recompute"`` key), and both sides of that trade depend on the model and the machine. On the
trainer's own runtime, for selective (the run's --recompute-modules, default core_attn) and
full (its --recompute-method / --recompute-num-layers, default uniform 1):

* ``activation_mb_per_token``: the same slope over lengths as mode none (``profile_memory``:
  saved-tensor bytes on CPU, the allocator's peak on GPU);
* ``compute_factor``: forward+backward time with the mode over the time without, at degree 1,
  timed alternately (a shared machine's drift hits every mode alike); at least 1;
* ``alltoall_factor``: all-to-all bytes with the mode over bytes without, in one group of every
  rank (the runtime counts the recompute's exchanges); on one rank, where no exchange exists,
  the runtime's structure gives it (full re-runs every exchange of the forward: 1.5; a
  recomputed core attention re-runs the q/k/v exchange, not the output's).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from megatron.flexsp.planner.fitting import fit_linear
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
from megatron.flexsp.runtime.recompute import RecomputeConfig

from .profile_config import ProfileConfig, ProfileError
from .profile_memory import activation_mb, memory_probe_lengths
from .profile_session import ProfileSession

__all__ = ["recompute_configs", "profile_recompute", "structural_alltoall_factor"]


def recompute_configs(pcfg: ProfileConfig) -> dict[str, RecomputeConfig]:
    """The two modes the profile measures, with the run's own recompute settings."""
    modules = tuple(pcfg.recompute_modules) if pcfg.recompute_modules else None
    return {
        "selective": RecomputeConfig("selective", modules=modules),
        "full": RecomputeConfig("full", method=pcfg.recompute_method, num_layers=pcfg.recompute_num_layers),
    }


def structural_alltoall_factor(ses: ProfileSession, rc: RecomputeConfig) -> float:
    """The all-to-all factor the runtime's structure implies (degree-independent: kv heads at degree 1)."""
    spec = rc.spec_for()
    if spec.mode == "full":
        return 1.5
    if not spec.selective("core_attn"):
        return 1.0
    qkv, out = ses.heads + 2 * ses.groups, ses.heads  # head counts of the q/k/v and output exchanges
    return 1.0 + qkv / (2.0 * (qkv + out))


def _activation_slope(ses: ProfileSession, lengths: list[int]) -> tuple[float, list[float]]:
    act = [activation_mb(ses, s) for s in lengths]
    slope = fit_linear(lengths, act).slope
    if slope <= 0:
        raise ProfileError(f"activation memory with recomputation does not grow with length ({act} MB)")
    return slope, act


def _time_ratios(ses: ProfileSession, pcfg: ProfileConfig, modes: dict[str, RecomputeConfig], length: int):
    """f+b ms per mode at degree 1, the modes alternating in every repetition."""
    plan = ses.degree1_plan([length], micro_batches=2)
    seqs = ses.seqs(plan.lengths)
    order = {"none": RecomputeConfig(), **modes}
    times: dict[str, list[float]] = {m: [] for m in order}
    for rep in range(pcfg.warmup + pcfg.repeats):
        for m, rc in order.items():
            ses.executor.set_recompute(rc)
            t = ses.step_ms(plan, seqs)
            if rep >= pcfg.warmup:
                times[m].append(t)
    ses.executor.set_recompute(RecomputeConfig())
    ses.optimizer.zero_grad(set_to_none=True)
    base = ses.stat(times["none"])
    return {m: ses.stat(ts) / base for m, ts in times.items() if m != "none"}, times


def _alltoall_factors(ses: ProfileSession, modes: dict[str, RecomputeConfig], length: int) -> dict[str, float]:
    """All-to-all bytes per mode over bytes without, in one group of every rank (largest rank's count)."""
    if ses.world < 2 or ses.heads % ses.world:
        return {m: structural_alltoall_factor(ses, rc) for m, rc in modes.items()}
    n = max(ses.world, length - length % ses.world)
    plan = Plan(ses.world, [n], [MicroBatch([Group(list(range(ses.world)), [0])])])
    seqs = ses.seqs(plan.lengths)
    counted = {}
    for m, rc in {"none": RecomputeConfig(), **modes}.items():
        ses.executor.set_recompute(rc)
        counted[m] = ses.max(ses.executor.run(plan, seqs).stats["a2a_bytes"])
    ses.executor.set_recompute(RecomputeConfig())
    ses.optimizer.zero_grad(set_to_none=True)
    return {m: counted[m] / counted["none"] for m in modes}


def profile_recompute(
    ses: ProfileSession, pcfg: ProfileConfig, memory: dict[str, Any], log: Callable[[str], None]
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The cost model's ``"recompute"`` entry and the raw measurements behind it (collective)."""
    modes = recompute_configs(pcfg)
    lengths = memory_probe_lengths(pcfg.max_len, ses.cuda)
    slopes, samples = {}, {}
    for m, rc in modes.items():
        ses.executor.set_recompute(rc)
        slopes[m], samples[m] = _activation_slope(ses, lengths)
    ses.executor.set_recompute(RecomputeConfig())
    top = min(lengths[-1], memory["tokens_per_gpu"]) if ses.cuda else lengths[-1]
    ratios, times = _time_ratios(ses, pcfg, modes, top)
    a2a = _alltoall_factors(ses, modes, top)
    entry = {
        m: {
            "activation_mb_per_token": slopes[m],
            "compute_factor": max(1.0, ratios[m]),  # recomputing never saves time: below 1 is noise
            "alltoall_factor": max(1.0, a2a[m]),
        }
        for m in modes
    }
    for m, e in entry.items():
        log(
            f"[flexsp-profile] recompute {m}: activation {e['activation_mb_per_token']:.5f} MB/token "
            f"({e['activation_mb_per_token'] / memory['activation_mb_per_token']:.2f}x none), f+b time "
            f"{ratios[m]:.3f}x, all-to-all {a2a[m]:.3f}x"
        )
    raw = {
        "lengths": lengths,
        "activation_samples": samples,
        "time_length": top,
        "time_ratio": ratios,
        "times_ms": {m: statistics.median(ts) for m, ts in times.items()},
        "alltoall_ratio": a2a,
    }
    return entry, raw
