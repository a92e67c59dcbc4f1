"""flexsp-profile: measure this cluster and model, write the cost-model JSON the planner uses.

Why: the planner is only as good as its cost model, and the cost model must come from the
users' hardware and model, not from a paper. Launched like the trainer (torchrun or srun, the
same model flags), it measures on every rank at once (as in training, where all ranks work):

* compute: forward+backward of one micro-batch at degree 1 (every rank its own group) through
  the real executor (FSDP2 collectives included), for single sequences of several lengths and
  for packs of equal sequences; alpha1, alpha2, beta1 by non-negative least squares on the
  relative error (timings span orders of magnitude); the fit error is printed.
* all-to-all: for every allowed degree d >= 2, all aligned groups of degree d exchange at once
  the real attention messages (q, k, v in one collective, then the output; forward and backward,
  kv heads replicated as the runtime does) for groups filled to 1/4, 1/2 and all of a GPU's
  token capacity. The wall time per layer, times the layers, gives the *effective* bandwidth
  that makes the cost model's formula (bytes_per_token * T / d / 2^20 / bw) reproduce the
  measured exchange time, copies included.
* memory: GPU: ``torch.cuda.max_memory_allocated`` during forward+backward above the model-state
  baseline (``memory_allocated`` after an optimizer step, i.e. sharded params + grads + Adam
  moments); the per-token slope over several lengths is ``activation_mb_per_token`` and the
  intercept (gathered layer weights, workspaces) is added to ``model_states_mb``.
  CPU: there is no allocator peak, so the profiler counts bytes instead: model states are the
  summed sizes of this rank's parameter shards, gradients and optimizer-state tensors; the
  activation is the summed size of the distinct storages autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``) during the forward, slope over lengths as on
  GPU. Transient buffers freed within the forward are not counted (they are not held per token).
* memory limit: ``--memory-limit-gb`` (GPU default: 90% of the device; CPU default: half of
  MemAvailable split over the node's ranks), or ``--capacity-tokens N`` (limit set so one GPU
  holds N tokens: the artificial limit of the CPU test cluster).

The fitting helpers (``fit_compute``, ``fit_bandwidth``, ``fit_linear``) live in the planner's
``fitting`` module (torch-free), shared with the online calibration of a training run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from flexsp_patches import cpu_compat
from megatron.flexsp.planner.costmodel import CostModel, CostModelError, alltoall_bytes_per_token
from megatron.flexsp.planner.fitting import ComputeFit, FitError, LinearFit, fit_bandwidth, fit_compute, fit_linear
from megatron.flexsp.planner.placement import candidate_groups
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
from megatron.flexsp.runtime.alltoall import AllToAllStats, head_to_seq, qkv_seq_to_head
from megatron.flexsp.runtime.executor import FlexSPExecutor
from megatron.flexsp.runtime.group_pool import GroupPool
from megatron.flexsp.runtime.model import build_gpt_model
from megatron.flexsp.runtime.sharding import shard_model

from . import arguments as A
from .configs import model_config_from_args
from .distributed import init_distributed, launch_env, run_entrypoint

__all__ = [
    "ProfileError",
    "ComputeFit",
    "LinearFit",
    "fit_compute",
    "fit_bandwidth",
    "fit_linear",
    "ProfileConfig",
    "ProfileReport",
    "add_profiler_args",
    "profile_config_from_args",
    "profile",
    "main",
]


# A profile that cannot be fitted or measured is the user's to fix (settings, lengths, memory): the
# planner's fitting error is that same error, so the profiler raises and documents one class.
ProfileError = FitError


@dataclass
class ProfileConfig:
    output: str = "cost_model.json"
    lengths: list[int] | None = None  # compute lengths at degree 1 (default: geometric up to max_len)
    max_len: int = 2048  # longest sequence profiled (the trainer's --seq-length), capped by memory
    repeats: int = 5
    warmup: int = 2
    memory_limit_gb: float | None = None
    capacity_tokens: int | None = None
    memory_fraction: float = 0.9  # GPU default limit: this share of the device memory
    gpus_per_node: int | None = None
    a2a_repeats: int = 5
    sharding: str = "fsdp2"
    name: str | None = None
    stat: str = "median"  # of repeated timings: median, or min on a machine shared with other work

    def validate(self) -> None:
        if self.lengths is not None and (not self.lengths or any(s < 1 for s in self.lengths)):
            raise ProfileError(f"--profile-lengths must be positive token counts, got {self.lengths}")
        if self.repeats < 1 or self.a2a_repeats < 1 or self.warmup < 0:
            raise ProfileError("--profile-repeats and --profile-a2a-repeats must be >= 1, --profile-warmup >= 0")
        if self.memory_limit_gb is not None and self.capacity_tokens is not None:
            raise ProfileError("give --memory-limit-gb or --capacity-tokens, not both")
        if self.memory_limit_gb is not None and not self.memory_limit_gb > 0:
            raise ProfileError(f"--memory-limit-gb must be > 0, got {self.memory_limit_gb}")
        if self.capacity_tokens is not None and self.capacity_tokens < 1:
            raise ProfileError(f"--capacity-tokens must be >= 1, got {self.capacity_tokens}")
        if self.stat not in ("median", "min"):
            raise ProfileError(f"--profile-stat must be median or min, got {self.stat!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ProfileError(f"--memory-fraction must be in (0, 1], got {self.memory_fraction}")


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_profiler_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The profiler's own flags (the model flags are the trainer's)."""
    g = parser.add_argument_group("flexsp-profile")
    g.add_argument("--output", "-o", default="cost_model.json", help="cost-model JSON to write")
    g.add_argument(
        "--profile-lengths",
        type=_int_list,
        default=None,
        help="sequence lengths timed at degree 1 (default: 6 lengths, geometric up to --seq-length)",
    )
    g.add_argument("--profile-repeats", type=int, default=5, help="timed repetitions per sample (median kept)")
    g.add_argument("--profile-warmup", type=int, default=2, help="untimed repetitions before each sample")
    g.add_argument("--profile-a2a-repeats", type=int, default=5)
    g.add_argument(
        "--profile-stat",
        choices=["median", "min"],
        default="median",
        help="statistic of repeated timings (min on a machine shared with other work)",
    )
    g.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="usable memory per GPU (default: --memory-fraction of the device; on CPU half of the "
        "available RAM per local rank)",
    )
    g.add_argument(
        "--capacity-tokens",
        type=int,
        default=None,
        help="instead of --memory-limit-gb: set the limit so one GPU holds this many tokens",
    )
    g.add_argument("--memory-fraction", type=float, default=0.9)
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: LOCAL_WORLD_SIZE (torchrun)")
    g.add_argument("--cost-model-name", default=None)
    return parser


def profile_config_from_args(args: argparse.Namespace) -> ProfileConfig:
    """ProfileConfig from a namespace; flags the trainer's parser lacks take their defaults."""
    d = ProfileConfig()
    get = lambda k, default: getattr(args, k, default) if getattr(args, k, None) is not None else default  # noqa: E731
    cfg = ProfileConfig(
        output=get("output", None) or get("flexsp_profile", d.output),
        lengths=get("profile_lengths", None),
        max_len=int(args.seq_length),
        repeats=get("profile_repeats", d.repeats),
        warmup=get("profile_warmup", d.warmup),
        memory_limit_gb=get("memory_limit_gb", None),
        capacity_tokens=get("capacity_tokens", None),
        memory_fraction=get("memory_fraction", d.memory_fraction),
        gpus_per_node=get("gpus_per_node", None),
        a2a_repeats=get("profile_a2a_repeats", d.a2a_repeats),
        sharding=get("flexsp_sharding", d.sharding),
        name=get("cost_model_name", None),
        stat=get("profile_stat", d.stat),
    )
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------ profiling


@dataclass
class ProfileReport:
    cost_model: dict[str, Any]
    compute_fit: ComputeFit
    compute_samples: list[dict[str, Any]]
    alltoall: dict[int, dict[str, Any]]
    memory: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        """Human-readable summary: samples against the fit, bandwidths, memory."""
        f = self.compute_fit
        lines = [
            f"compute fit (degree 1, {f.samples} samples): alpha1 {f.alpha1_ms_per_token2:.4g} ms/token^2, "
            f"alpha2 {f.alpha2_ms_per_token:.4g} ms/token, beta1 {f.beta1_ms:.4g} ms; "
            f"fit error rms {100 * f.rms_rel_err:.1f}%, max {100 * f.max_rel_err:.1f}%",
            f"  {'lengths':<28}{'measured ms':>12}{'fit ms':>10}{'error':>8}",
        ]
        for s in self.compute_samples:
            desc = f"{len(s['lengths'])} x {s['lengths'][0]}" if len(s["lengths"]) > 1 else str(s["lengths"][0])
            pred = f.predict(s["lengths"])
            lines.append(f"  {desc:<28}{s['ms']:>12.2f}{pred:>10.2f}{100 * (pred - s['ms']) / s['ms']:>7.1f}%")
        if self.alltoall:
            lines.append(
                f"  {'all-to-all degree':<20}{'GB/s (effective)':>18}{'GB/s (collective)':>19}{'tokens/rank':>14}"
            )
            for d, a in sorted(self.alltoall.items()):
                lines.append(
                    f"  {d:<20}{a['bandwidth_gbs']:>18.3f}{a['collective_gbs']:>19.3f}"
                    f"{','.join(str(x) for x in a['tokens_per_rank']):>14}"
                )
        m = self.memory
        lines.append(
            f"memory ({m['method']}): model states {m['model_states_mb']:.2f} MB (measured "
            f"{m['measured_states_mb']:.2f} + fixed {m['fixed_mb']:.2f}), activation "
            f"{m['activation_mb_per_token']:.5f} MB/token, limit {m['limit_gb']:.4g} GB -> "
            f"{m['tokens_per_gpu']} tokens per GPU"
        )
        return "\n".join(lines)


def _geometric(lo: int, hi: int, n: int) -> list[int]:
    if hi <= lo:
        return [hi]
    vals = sorted({int(round(lo * (hi / lo) ** (i / (n - 1)))) for i in range(n)})
    return vals


# On GPU the memory probe stays small: activation memory is linear in tokens, so there is no need
# to go near the device's limit (a long probe only costs start-up time).
GPU_MEMORY_PROBE_CAP = 8192


def memory_probe_lengths(max_len: int, cuda: bool) -> list[int]:
    """Four lengths for the activation-memory slope: geometric up to --seq-length (capped on GPU).

    The series is built up to the cap, not filtered after: filtering a series up to 65536 at 8192
    kept a single length, and a slope needs two.
    """
    top = min(max_len, GPU_MEMORY_PROBE_CAP) if cuda else max_len
    if top < 64:
        return [16, 32, 64]
    return _geometric(max(16, top // 16), top, 4)


class _Session:
    """Model, sharding, groups and executor on this rank; measurements on top (collective)."""

    def __init__(self, model_cfg, pcfg: ProfileConfig, device, vocab_size: int):
        self.torch, self.dist = torch, dist
        self.cfg, self.pcfg, self.device, self.vocab = model_cfg, pcfg, device, vocab_size
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = device.type == "cuda"
        g = pcfg.gpus_per_node or self.world
        if g < 1 or (self.world > g and self.world % g):
            raise ProfileError(f"world size {self.world} is not a multiple of gpus per node {g}")
        self.gpus_per_node = min(g, self.world) if self.world <= g else g
        self.heads = model_cfg.num_attention_heads
        self.groups = model_cfg.num_query_groups or self.heads
        self.bytes_per_element = 2 if model_cfg.bf16 else 4  # what the exchange carries (fp32 on CPU)
        # Degrees the trainer's pool will hold: a provisional cost model with every candidate degree
        # (bandwidth placeholders) through the planner's own rule, so the groups are exactly the trainer's.
        self.provisional = CostModel.from_dict(
            self._cost_dict(
                {"alpha1_ms_per_token2": 0.0, "alpha2_ms_per_token": 1.0, "beta1_ms": 0.0},
                {str(d): 1.0 for d in range(2, max(self.world, 2) + 1)},
                1e9,
                0.0,
                1.0,
            )
        )
        self.degrees = self.provisional.allowed_degrees(self.world)
        self.pool = GroupPool(candidate_groups(self.provisional, self.world))
        self.model = build_gpt_model(model_cfg, device=device)
        shard_model(self.model, pcfg.sharding)
        self.executor = FlexSPExecutor(self.model, self.pool, sharding_mode=pcfg.sharding)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.0)
        self._gen = torch.Generator().manual_seed(1234 + self.rank)

    # -- helpers
    def _cost_dict(self, compute, bandwidth, limit_gb, states_mb, act_mb) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.pcfg.name or "profiled",
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_query_groups or c.num_attention_heads,
            "gpus_per_node": self.gpus_per_node,
            "compute": compute,
            "alltoall": {
                "bytes_per_token": alltoall_bytes_per_token(
                    c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, self.bytes_per_element
                ),
                "bandwidth_gbs": bandwidth,
            },
            "memory": {"limit_gb": limit_gb, "model_states_mb": states_mb, "activation_mb_per_token": act_mb},
        }

    def _max(self, x: float) -> float:
        t = self.torch.tensor([float(x)], dtype=self.torch.float64, device=self.device if self.cuda else "cpu")
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def _stat(self, times: Sequence[float]) -> float:
        """Median of repeated timings, or the minimum (interference from other processes only adds time)."""
        return min(times) if self.pcfg.stat == "min" else statistics.median(times)

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _seqs(self, lengths: Sequence[int]):
        return [self.torch.randint(0, self.vocab, (s + 1,), generator=self._gen) for s in lengths]

    def _degree1_plan(self, per_rank: Sequence[int], micro_batches: int = 1):
        """Every rank its own group holding sequences of ``per_rank`` lengths, in each micro-batch."""
        k = len(per_rank)
        lengths = [int(s) for _ in range(micro_batches * self.world) for s in per_rank]
        mbs = []
        for m in range(micro_batches):
            base = m * self.world * k
            mbs.append(
                MicroBatch(
                    groups=[
                        Group(ranks=[r], sequences=list(range(base + r * k, base + (r + 1) * k)))
                        for r in range(self.world)
                    ]
                )
            )
        return Plan(world_size=self.world, lengths=lengths, micro_batches=mbs)

    def _step(self, plan, seqs) -> float:
        """Wall ms of one executor run (forward+backward of the plan), slowest rank."""
        self.dist.barrier()
        self._sync()
        t0 = time.perf_counter()
        self.executor.run(plan, seqs)
        self._sync()
        ms = (time.perf_counter() - t0) * 1e3
        return self._max(ms)

    # -- memory
    def model_states_mb(self) -> float:
        """After one optimizer step: GPU allocator bytes; CPU summed bytes of shards, grads, Adam state."""
        plan = self._degree1_plan([16])
        self.executor.run(plan, self._seqs(plan.lengths))
        self.optimizer.step()  # materialises Adam moments (lr 0: weights unchanged)
        self._sync()
        if self.cuda:
            mb = self.torch.cuda.memory_allocated(self.device) / 2**20
        else:
            total = 0
            for p in self.model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                total += local.numel() * local.element_size()
                if p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    total += g.numel() * g.element_size()
            for st in self.optimizer.state.values():
                for v in st.values():
                    if self.torch.is_tensor(v):
                        t = v.to_local() if hasattr(v, "to_local") else v
                        total += t.numel() * t.element_size()
            mb = total / 2**20
        return self._max(mb)

    def activation_mb(self, length: int) -> float:
        """Activation MB of one sequence of ``length`` at degree 1 (slowest... largest rank)."""
        plan = self._degree1_plan([length])
        seqs = self._seqs(plan.lengths)
        torch = self.torch
        if self.cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.executor.run(plan, seqs)
            self._sync()
            mb = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        else:
            seen: dict[int, int] = {}

            def pack(t):
                try:
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
                except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
                    seen[id(t)] = t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.executor.run(plan, seqs)
            mb = sum(seen.values()) / 2**20
        return self._max(mb)

    # -- compute
    def compute_samples(self, lengths: Sequence[int], micro_batches: int = 4) -> list[dict[str, Any]]:
        """Single sequences of every length, plus packs of equal sequences filling the longest.

        Each timing runs ``micro_batches`` identical micro-batches in one executor call (as a
        training step does) and is divided by their number, so the once-per-step work (plan
        check, loss all-reduce) is not charged to every micro-batch's beta1.
        """
        top = max(lengths)
        shapes = [[s] for s in lengths] + [[s] * (top // s) for s in lengths if top // s >= 2]
        out = []
        for per_rank in shapes:
            plan = self._degree1_plan(per_rank, micro_batches)
            seqs = self._seqs(plan.lengths)
            for _ in range(self.pcfg.warmup):
                self._step(plan, seqs)
            times = [self._step(plan, seqs) / micro_batches for _ in range(self.pcfg.repeats)]
            out.append({"lengths": list(per_rank), "ms": self._stat(times), "all_ms": times})
        self.optimizer.zero_grad(set_to_none=True)
        return out

    # -- all-to-all
    def alltoall(self, degree: int, tokens_per_rank: Sequence[int]) -> dict[str, Any]:
        """Effective bandwidth of degree ``degree``: every aligned group exchanges at once."""
        torch = self.torch
        c = self.cfg
        dh = c.kv_channels or c.hidden_size // c.num_attention_heads
        dtype = torch.bfloat16 if c.bf16 else torch.float32
        block = self.rank // degree
        in_group = (block + 1) * degree <= self.world
        group = self.pool.get(list(range(block * degree, (block + 1) * degree))) if in_group else None
        bpt = alltoall_bytes_per_token(
            c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, self.bytes_per_element
        )
        samples, coll = [], []
        for s in tokens_per_rank:
            q = torch.randn(s, self.heads, dh, device=self.device, dtype=dtype, requires_grad=True)
            k = torch.randn(s, self.groups, dh, device=self.device, dtype=dtype, requires_grad=True)
            v = torch.randn(s, self.groups, dh, device=self.device, dtype=dtype, requires_grad=True)

            def one_layer(stats, q=q, k=k, v=v):
                q2, k2, v2 = qkv_seq_to_head(q, k, v, group, stats)
                (o,) = head_to_seq([q2 + 0.0], group, stats)  # stands in for the attention output
                (o.sum() + k2.sum() + v2.sum()).backward()

            walls, colls = [], []
            for i in range(self.pcfg.warmup + self.pcfg.a2a_repeats):
                stats = AllToAllStats()
                self.dist.barrier()
                self._sync()
                t0 = time.perf_counter()
                if in_group:
                    one_layer(stats)
                self._sync()
                wall = self._max((time.perf_counter() - t0) * 1e3)
                cms = self._max(stats.ms if in_group else 0.0)
                if i >= self.pcfg.warmup:
                    walls.append(wall)
                    colls.append((cms, stats.bytes))
            ms_layer = self._stat(walls)
            model_mb = bpt * s * degree / degree / 2**20  # formula MB per rank for T = s * degree tokens
            samples.append((model_mb, ms_layer * c.num_layers))
            cms = self._stat([x for x, _ in colls])
            nbytes = self._max(colls[0][1])
            coll.append((nbytes / 2**20, cms))
        return {
            "bandwidth_gbs": fit_bandwidth(samples),
            "collective_gbs": fit_bandwidth(coll) if all(m > 0 for _, m in coll) else float("nan"),
            "tokens_per_rank": list(tokens_per_rank),
            "samples_mb_ms": samples,
        }


def _default_limit_gb(pcfg: ProfileConfig, cuda: bool, device, local_ranks: int) -> float:
    if pcfg.memory_limit_gb is not None:
        return pcfg.memory_limit_gb
    if cuda:
        return torch.cuda.get_device_properties(device).total_memory * pcfg.memory_fraction / 2**30
    avail_kb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail_kb = int(line.split()[1])
    except OSError:
        pass
    if avail_kb is None:
        raise ProfileError("cannot read MemAvailable from /proc/meminfo: give --memory-limit-gb or --capacity-tokens")
    return avail_kb / 2**20 / 2 / max(1, local_ranks)


def _profile_memory(ses: _Session, pcfg: ProfileConfig, device, log) -> dict[str, Any]:
    """Model states and the activation slope; the limit and the tokens one GPU holds (first: it bounds the rest)."""
    states = ses.model_states_mb()
    mem_lengths = memory_probe_lengths(pcfg.max_len, ses.cuda)
    act = [ses.activation_mb(s) for s in mem_lengths]
    lin = fit_linear(mem_lengths, act)
    if lin.slope <= 0:
        raise ProfileError(
            f"activation memory does not grow with length ({dict(zip(mem_lengths, act))} MB): "
            "cannot derive a per-token cost"
        )
    fixed = max(0.0, lin.intercept)
    states_total = states + fixed
    if pcfg.capacity_tokens is not None:
        limit_gb = (states_total + lin.slope * pcfg.capacity_tokens) / 1024 * (1 + 1e-9)
    else:
        limit_gb = _default_limit_gb(pcfg, ses.cuda, device, ses.gpus_per_node)
    if states_total >= limit_gb * 1024:
        raise ProfileError(
            f"model states need {states_total:.1f} MB per GPU, above the memory limit "
            f"{limit_gb * 1024:.1f} MB: use more GPUs or raise --memory-limit-gb"
        )
    tokens_per_gpu = int((limit_gb * 1024 - states_total) / lin.slope)
    log(
        f"[flexsp-profile] memory: states {states:.3f} MB + fixed {fixed:.3f} MB, activation "
        f"{lin.slope:.5f} MB/token, limit {limit_gb:.4g} GB -> {tokens_per_gpu} tokens per GPU"
    )
    return {
        "method": "cuda max_memory_allocated" if ses.cuda else "tensor bytes (saved_tensors_hooks + states)",
        "model_states_mb": states_total,
        "measured_states_mb": states,
        "fixed_mb": fixed,
        "activation_mb_per_token": lin.slope,
        "limit_gb": limit_gb,
        "tokens_per_gpu": tokens_per_gpu,
        "samples": dict(zip(mem_lengths, act)),
    }


def _profile_compute(ses: _Session, pcfg: ProfileConfig, tokens_per_gpu: int, log) -> tuple[ComputeFit, list]:
    """Degree-1 forward+backward samples and the alpha-beta fit.

    On GPU a degree-1 sample must fit the device; on CPU the limit is a configured number, and
    timing up to --seq-length keeps alpha1 from being extrapolated far beyond the samples.
    """
    top = min(pcfg.max_len, tokens_per_gpu) if ses.cuda else pcfg.max_len
    lengths = sorted(set(pcfg.lengths)) if pcfg.lengths else _geometric(max(32, top // 32), top, 6)
    too_long = [s for s in lengths if s > tokens_per_gpu] if ses.cuda else []
    if too_long:
        raise ProfileError(f"--profile-lengths {too_long} do not fit one GPU ({tokens_per_gpu} tokens)")
    if len(lengths) < 3:
        raise ProfileError(f"need at least three profile lengths, got {lengths}")
    samples = ses.compute_samples(lengths)
    fit = fit_compute([(s["lengths"], s["ms"]) for s in samples])
    log(
        f"[flexsp-profile] compute: {len(samples)} samples, fit error rms {100 * fit.rms_rel_err:.1f}% max "
        f"{100 * fit.max_rel_err:.1f}%"
    )
    return fit, samples


def _profile_alltoall(ses: _Session, pcfg: ProfileConfig, tokens_per_gpu: int, log) -> tuple[dict, dict[str, float]]:
    """Effective bandwidth per allowed degree >= 2 (groups filled to 1/4, 1/2 and all of a GPU's tokens)."""
    a2a: dict[int, dict[str, Any]] = {}
    cap_rank = min(tokens_per_gpu, pcfg.max_len)
    for d in ses.degrees:
        if d > 1:
            a2a[d] = ses.alltoall(d, sorted({max(1, cap_rank // 4), max(1, cap_rank // 2), cap_rank}))
    if not a2a and ses.world > 1:
        log("[flexsp-profile] warning: no degree >= 2 is allowed (heads/topology); the model allows degree 1 only")
    bandwidth = {str(d): a["bandwidth_gbs"] for d, a in a2a.items()}
    if not bandwidth:
        # The JSON form needs one entry. Nothing was measured (one rank, or no degree >= 2 divides
        # the heads), so the entry goes to a degree that does not divide the head count: the cost
        # model can never allow it, and no plan can use an unmeasured bandwidth.
        never = next(d for d in range(2, ses.heads + 2) if ses.heads % d)
        bandwidth = {str(never): 1.0}
        log(
            f"[flexsp-profile] no all-to-all measured (world size {ses.world}); placeholder bandwidth on degree "
            f"{never}, which {ses.heads} heads never allow: profile on the real node count before training on it"
        )
    return a2a, bandwidth


def run_profile(model_cfg, pcfg: ProfileConfig, device, vocab_size: int, *, log=print) -> ProfileReport:
    """All measurements on the current process group (collective); returns the report on every rank."""
    pcfg.validate()
    t_start = time.perf_counter()
    ses = _Session(model_cfg, pcfg, device, vocab_size)
    memory = _profile_memory(ses, pcfg, device, log)
    fit, samples = _profile_compute(ses, pcfg, memory["tokens_per_gpu"], log)
    a2a, bandwidth = _profile_alltoall(ses, pcfg, memory["tokens_per_gpu"], log)
    ses.pcfg.name = pcfg.name or (
        f"profiled: {model_cfg.num_layers}L h{model_cfg.hidden_size} on {ses.world} x "
        f"{torch.cuda.get_device_name(device) if ses.cuda else 'CPU (gloo)'}"
    )
    compute = {
        "alpha1_ms_per_token2": fit.alpha1_ms_per_token2,
        "alpha2_ms_per_token": fit.alpha2_ms_per_token,
        "beta1_ms": fit.beta1_ms,
    }
    cost = CostModel.from_dict(
        ses._cost_dict(
            compute, bandwidth, memory["limit_gb"], memory["model_states_mb"], memory["activation_mb_per_token"]
        )
    )
    env = {
        "world_size": ses.world,
        "gpus_per_node": ses.gpus_per_node,
        "device": str(device),
        "backend": ses.dist.get_backend(),
        "seconds": time.perf_counter() - t_start,
    }
    return ProfileReport(
        cost_model=cost.to_dict(),
        compute_fit=fit,
        compute_samples=samples,
        alltoall=a2a,
        memory=memory,
        environment=env,
    )


def profile(args: argparse.Namespace, env=None, *, log=print) -> ProfileReport:
    """Profile with the trainer's flags (pretrain_gpt_flexsp.py --flexsp-profile uses this).

    Initialises torch.distributed from the launch environment when needed; rank 0 writes
    ``output`` (ProfileConfig) and prints the summary. Returns the report on every rank.
    """
    pcfg = profile_config_from_args(args)
    env = env or launch_env()
    if pcfg.gpus_per_node is None:
        pcfg.gpus_per_node = env.local_world_size
    device = init_distributed(env, getattr(args, "distributed_backend", None))
    cpu_compat.init_model_parallel(getattr(args, "seed", 1234))
    model_cfg = model_config_from_args(args, cuda=device.type == "cuda")
    report = run_profile(model_cfg, pcfg, device, model_cfg.vocab_size, log=log if env.rank == 0 else (lambda *_: None))
    if env.rank == 0:
        out = dict(report.cost_model)
        out["profile"] = {
            "compute_fit": asdict(report.compute_fit),
            "compute_samples": report.compute_samples,
            "alltoall": {str(d): {k: v for k, v in a.items()} for d, a in report.alltoall.items()},
            "memory": {
                k: (v if k != "samples" else {str(a): b for a, b in v.items()}) for k, v in report.memory.items()
            },
            "environment": report.environment,
        }
        CostModel.from_dict(out)  # what the planner will read back
        os.makedirs(os.path.dirname(os.path.abspath(pcfg.output)), exist_ok=True)
        with open(pcfg.output, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        log(report.format())
        log(f"[flexsp-profile] wrote {pcfg.output}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = A.build_parser()
    p.prog = "flexsp-profile"
    p.description = (
        "Measure compute, all-to-all bandwidth and memory of this model on this cluster and write the "
        "FlexSP cost-model JSON. Launch like the trainer (torchrun/srun) with the same model flags."
    )
    return add_profiler_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    """flexsp-profile: the profiler's flags first, the rest through the trainer's own parser (same defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0
    pargs, rest = add_profiler_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    args = A.parse_args(rest)
    for k, v in vars(pargs).items():
        setattr(args, k, v)

    def body() -> None:
        profile(args)

    return run_entrypoint("flexsp-profile", body, (ProfileError, A.ArgumentError, CostModelError))


if __name__ == "__main__":
    sys.exit(main())
