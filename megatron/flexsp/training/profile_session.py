"""The profiler's session: the trainer's runtime on this rank, and the timed runs on top of it.

Why the trainer's runtime: a measurement is only valid for what training will run, so the
session builds model, sharding, SP group pool and executor with the same builder as the Trainer
(``runtime.build.build_runtime``), from a provisional cost model that allows every candidate
degree (bandwidth placeholders): the pool is exactly the trainer's. Every measurement is
collective and reports the slowest (or largest) rank.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron.flexsp.planner.costmodel import CostModel, alltoall_bytes_per_token
from megatron.flexsp.planner.plan import Group, MicroBatch, Plan
from megatron.flexsp.runtime.build import build_runtime
from megatron.flexsp.runtime.model import GPTConfig

from .profile_config import ProfileConfig, ProfileError

__all__ = ["ProfileSession"]


class ProfileSession:
    """Model, sharding, groups and executor on this rank; timing primitives on top (collective)."""

    def __init__(self, model_cfg: GPTConfig, pcfg: ProfileConfig, device: torch.device, vocab_size: int):
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
        provisional = CostModel.from_dict(
            self.cost_dict(
                {"alpha1_ms_per_token2": 0.0, "alpha2_ms_per_token": 1.0, "beta1_ms": 0.0},
                {str(d): 1.0 for d in range(2, max(self.world, 2) + 1)},
                1e9,
                0.0,
                1.0,
            )
        )
        rt = build_runtime(model_cfg, provisional, device=device, sharding=pcfg.sharding)
        self.model, self.pool, self.executor = rt.model, rt.pool, rt.executor
        self.degrees = self.pool.degrees  # the degrees the trainer's pool will hold
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.0)
        self._gen = torch.Generator().manual_seed(1234 + self.rank)

    def cost_dict(self, compute, bandwidth, limit_gb, states_mb, act_mb) -> dict[str, Any]:
        """The cost-model JSON of this model and topology with the given measured parts."""
        c = self.cfg
        return {
            "name": self.pcfg.name or "profiled",
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_query_groups or c.num_attention_heads,
            "gpus_per_node": self.gpus_per_node,
            "compute": compute,
            "alltoall": {"bytes_per_token": self.alltoall_bytes_per_token(), "bandwidth_gbs": bandwidth},
            "memory": {"limit_gb": limit_gb, "model_states_mb": states_mb, "activation_mb_per_token": act_mb},
        }

    def alltoall_bytes_per_token(self) -> float:
        c = self.cfg
        return alltoall_bytes_per_token(
            c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, self.bytes_per_element
        )

    # -- collective primitives
    def max(self, x: float) -> float:
        """The maximum of ``x`` over all ranks."""
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device if self.cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def stat(self, times: Sequence[float]) -> float:
        """Median of repeated timings, or the minimum (interference from other processes only adds time)."""
        return min(times) if self.pcfg.stat == "min" else statistics.median(times)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seqs(self, lengths: Sequence[int]) -> list[torch.Tensor]:
        return [torch.randint(0, self.vocab, (s + 1,), generator=self._gen) for s in lengths]

    def degree1_plan(self, per_rank: Sequence[int], micro_batches: int = 1) -> Plan:
        """Every rank its own group holding sequences of ``per_rank`` lengths, in each micro-batch."""
        k = len(per_rank)
        lengths = [int(s) for _ in range(micro_batches * self.world) for s in per_rank]
        mbs = []
        for m in range(micro_batches):
            base = m * self.world * k
            groups = [
                Group(ranks=[r], sequences=list(range(base + r * k, base + (r + 1) * k))) for r in range(self.world)
            ]
            mbs.append(MicroBatch(groups=groups))
        return Plan(world_size=self.world, lengths=lengths, micro_batches=mbs)

    def step_ms(self, plan: Plan, seqs: list[torch.Tensor]) -> float:
        """Wall ms of one executor run (forward+backward of the plan), slowest rank."""
        dist.barrier()
        self.sync()
        t0 = time.perf_counter()
        self.executor.run(plan, seqs)
        self.sync()
        return self.max((time.perf_counter() - t0) * 1e3)

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
            plan = self.degree1_plan(per_rank, micro_batches)
            seqs = self.seqs(plan.lengths)
            for _ in range(self.pcfg.warmup):
                self.step_ms(plan, seqs)
            times = [self.step_ms(plan, seqs) / micro_batches for _ in range(self.pcfg.repeats)]
            out.append({"lengths": list(per_rank), "ms": self.stat(times), "all_ms": times})
        self.optimizer.zero_grad(set_to_none=True)
        return out
