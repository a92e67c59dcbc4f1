"""Run one global batch under a FlexSP plan: every micro-batch, every rank in its SP group.

Why: the plan is the only thing that changes between iterations; the executor turns it into
the per-rank work: for each micro-batch, enter the group that holds this rank, pack that
group's sequences and take this rank's contiguous slice, run forward (attention exchanges
tokens inside the group), weight the loss by the tokens of the whole global batch, run backward
and accumulate gradients. A rank whose group got no sequence (a batch with fewer sequences than
groups) still runs a forward/backward on one block of padding with zero loss weight, so FSDP2's
per-layer collectives line up on every rank. The optimizer step is the trainer's.

Before any work, the plan is checked on every rank (partition of ranks, pool membership, head
divisibility, sequence lengths) and a fingerprint of it is compared across ranks in one small
collective, so a bad or inconsistent plan fails on every rank within seconds instead of hanging.

Tensor parallelism (issue 20, contract C6): a model built at TP t runs plans of
``tensor_parallel_size`` t, whose groups are unit groups; rank r takes the group of unit r // t,
exchanges with the same TP rank of the group's other units (``GroupPool.members``), and all t
ranks of a unit process the same tokens. The reported loss sums over one rank per unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron.flexsp.planner.plan import Plan, PlanError, validate_plan

from . import loss as loss_mod
from .alltoall import get_stats as a2a_stats
from .packing import pack_group
from .recompute import RecomputeConfig, attach_spec, install_recompute
from .sharding import finish_grad_sync, sharding_mode_of
from .sp_group import ActiveSPGroup, packed_seq_params, sp_group

__all__ = ["StepResult", "FlexSPExecutor", "PlanMismatchError"]


class PlanMismatchError(PlanError):
    """Ranks disagree on the plan, or another rank rejected it."""


@dataclass
class StepResult:
    """Outcome of one global batch on this rank.

    ``loss``: global token-mean cross entropy (same on every rank); ``num_tokens``: loss tokens of
    the global batch; ``stats``: this rank's tokens (its unpadded share of the packed tokens),
    padded tokens, fwd_ms, bwd_ms, a2a_ms, a2a_bytes, micro_batches, per-micro-batch details;
    ``all_stats``: every rank's stats (only with ``gather_stats=True``, else None).
    """

    loss: float
    num_tokens: int
    stats: dict[str, Any]
    all_stats: list[dict[str, Any]] | None = None
    micro_batch_stats: list[dict[str, Any]] = field(default_factory=list)


def _plan_fingerprint(plan: Plan) -> int:
    """A 62-bit hash of the plan's structure (what every rank must agree on)."""
    d = {
        "world_size": plan.world_size,
        "lengths": list(plan.lengths),
        "micro_batches": [mb.to_dict() for mb in plan.micro_batches],
    }
    h = hashlib.sha256(repr(d).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 2


def _a2a_stats_reader():
    """(reset, read) over the runtime's process-wide all-to-all counters (alltoall.get_stats())."""
    stats = a2a_stats()

    def read() -> tuple[float, int]:
        return float(stats.ms), int(stats.bytes)

    return stats.reset, read


class FlexSPExecutor:
    """Forward/backward of a whole plan on this rank; gradients end up reduced over all ranks.

    ``model``: a GPTModel from ``build_gpt_model``, prepared with ``shard_model(model, mode)``.
    ``pool``: the GroupPool holding every group the plans use. ``sharding_mode`` must match
    ``shard_model``. ``pad_multiple``: packing granularity the attention backend needs (the
    packed length of a group is padded to a multiple of lcm(degree, pad_multiple); 1 for the
    current backends). With ``sync_grads`` (default) ``run`` also finishes the plain
    data-parallel gradient all-reduce, so after ``run`` gradients are global sums in both modes
    (do not call ``finish_grad_sync`` again). ``time_cuda`` synchronises the device around
    forward and backward so the per-rank ms are exact (small cost; off = launch times only).
    ``check_consistency`` compares the plan across ranks (one tiny all-reduce per step).
    ``recompute``: the run's activation recomputation (default none); a fixed granularity applies
    to every micro-batch, ``auto`` applies each plan group's ``recompute`` mode.
    """

    def __init__(
        self,
        model: nn.Module,
        pool,
        *,
        sharding_mode: str = "fsdp2",
        pad_multiple: int = 1,
        sync_grads: bool = True,
        time_cuda: bool = True,
        check_consistency: bool = True,
        recompute: RecomputeConfig | None = None,
    ):
        actual = sharding_mode_of(model)
        if actual is None:
            raise ValueError("FlexSPExecutor: the model was not prepared with shard_model(model, mode)")
        if actual != sharding_mode:
            raise ValueError(f"FlexSPExecutor: sharding_mode={sharding_mode!r} but the model was sharded as {actual!r}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.model = model
        self.pool = pool
        self.sharding_mode = sharding_mode
        self.pad_multiple = int(pad_multiple)
        self.sync_grads = sync_grads
        self.check_consistency = check_consistency
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        cfg = getattr(model, "_flexsp_cfg", None)
        self.num_heads = getattr(cfg, "num_attention_heads", None) or getattr(
            getattr(model, "config", None), "num_attention_heads", None
        )
        self.bf16 = bool(getattr(cfg, "bf16", False))
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or 0)
        learned = getattr(cfg, "position_embedding_type", None) == "learned_absolute"
        self.max_positions = int(cfg.max_position_embeddings) if learned else 0
        self.device = next(model.parameters()).device
        self._init_tensor_parallel(cfg, pool)
        if self.bf16 and sharding_mode == "ddp" and self.device.type != "cuda":
            raise ValueError(
                "bf16 with sharding_mode='ddp' needs CUDA (megatron's linear layers restore autocast "
                "in backward only on CUDA); use sharding_mode='fsdp2' (bf16 mixed precision) on CPU"
            )
        self.time_cuda = time_cuda and self.device.type == "cuda"
        self._a2a_reset, self._a2a_read = _a2a_stats_reader()
        self.set_recompute(recompute or RecomputeConfig())

    def _init_tensor_parallel(self, cfg, pool) -> None:
        """This rank's unit and TP size; the pool must pair units the same way (contract C6)."""
        self.tp = int(getattr(cfg, "tensor_model_parallel_size", 1) or 1)
        pool_tp = int(pool.tensor_parallel_size)
        if pool_tp != self.tp:
            raise ValueError(
                f"FlexSPExecutor: the model is tensor-parallel over {self.tp} ranks but the group pool "
                f"pairs units of {pool_tp}: build the pool with tensor_parallel_size={self.tp}"
            )
        self.unit = self.rank // self.tp
        self.sequence_parallel = bool(getattr(cfg, "sequence_parallel", False))
        self.loss_group = loss_mod.token_group(self.tp)

    def set_recompute(self, recompute: RecomputeConfig) -> None:
        """Change the run's recomputation (the profiler measures every mode on one model)."""
        self.recompute = recompute
        if recompute.granularity != "none":
            install_recompute(self.model)

    # ------------------------------------------------------------------ checks
    def _local_check(self, plan: Plan, sequences: Sequence[Tensor]) -> str | None:
        """None if the plan is runnable here, else the reason (never raises)."""
        try:
            validate_plan(plan, world_size=self.world_size, num_sequences=len(sequences))
            plan_tp = plan.tensor_parallel_size
            if plan_tp != self.tp:
                raise PlanError(
                    f"plan is for tensor_parallel_size {plan_tp}, but the model is tensor-parallel over {self.tp} ranks"
                )
            heads = None if self.num_heads is None else self.num_heads // self.tp  # this rank's heads
            for m, mb in enumerate(plan.micro_batches):
                try:
                    self.pool.check_partition([g.ranks for g in mb.groups])
                except ValueError as e:
                    raise PlanError(f"micro-batch {m}: {e}") from None
                for gi, g in enumerate(mb.groups):
                    if heads is not None and heads % g.degree:
                        per_rank = "" if self.tp == 1 else f" / tensor-parallel size {self.tp}"
                        raise PlanError(
                            f"micro-batch {m} group {gi} (ranks {g.ranks}): degree {g.degree} does not "
                            f"divide num_attention_heads {self.num_heads}{per_rank}"
                        )
            for i, s in enumerate(sequences):
                if not isinstance(s, Tensor) or s.dim() != 1:
                    raise PlanError(
                        f"sequence {i} must be a 1-D token tensor, got "
                        f"{type(s).__name__} {tuple(getattr(s, 'shape', ()))}"
                    )
                if s.dtype not in (torch.int64, torch.int32):
                    raise PlanError(f"sequence {i} must hold integer token ids, got dtype {s.dtype}")
                if s.numel() != plan.lengths[i] + 1:
                    raise PlanError(
                        f"sequence {i} has {s.numel()} ids but the plan says length {plan.lengths[i]} "
                        f"(a sequence of length L has L + 1 ids)"
                    )
                if self.vocab_size and s.numel() and (int(s.min()) < 0 or int(s.max()) >= self.vocab_size):
                    raise PlanError(
                        f"sequence {i} has token ids outside the vocabulary 0..{self.vocab_size - 1} "
                        f"(min {int(s.min())}, max {int(s.max())})"
                    )
            if self.max_positions and plan.lengths and max(plan.lengths) > self.max_positions:
                i = max(range(len(plan.lengths)), key=lambda j: plan.lengths[j])
                raise PlanError(
                    f"sequence {i} has length {plan.lengths[i]}, more than the model's learned absolute "
                    f"position embeddings ({self.max_positions})"
                )
        except (PlanError, ValueError) as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - any local failure must reach the agreement step, not hang peers
            return f"{type(e).__name__}: {e}"
        return None

    def validate(self, plan: Plan, sequences: Sequence[Tensor]) -> None:
        """Check the plan on every rank and agree across ranks; raise the same way everywhere.

        One collective: (max fingerprint, -min fingerprint, any error) over all ranks.
        """
        reason = self._local_check(plan, sequences)
        if not self.check_consistency:
            if reason:
                raise PlanError(f"rank {self.rank}: plan rejected: {reason}")
            return
        fp = _plan_fingerprint(plan)
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([fp, -fp, 1 if reason else 0], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        vmax, vmin, err = int(t[0]), -int(t[1]), int(t[2])
        if reason:
            raise PlanError(f"rank {self.rank}: plan rejected: {reason}")
        if err:
            raise PlanMismatchError(
                f"rank {self.rank}: plan rejected by another rank (see its error); no micro-batch was run"
            )
        if vmax != vmin:
            raise PlanMismatchError(
                f"rank {self.rank}: ranks were given different plans (fingerprints differ); "
                f"the plan must be broadcast from one source"
            )

    # ------------------------------------------------------------------- run
    def _sync(self):
        if self.time_cuda:
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        if self.bf16 and self.sharding_mode == "ddp":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(
        self,
        seqs: list[Tensor],
        active: ActiveSPGroup,
        global_tokens: int,
        forward_only: bool = False,
        recompute_mode: str = "none",
    ) -> dict[str, Any]:
        # An empty group packs one block of padding only (loss mask 0): same collectives, no loss.
        pad = self.pad_multiple
        if self.sequence_parallel:  # megatron's TP-sequence parallelism splits each rank's slice over t
            pad = math.lcm(pad, active.world_size * self.tp)
        sl = pack_group(seqs, active.rank, active.world_size, pad_multiple=pad)
        dev = self.device
        psp = packed_seq_params(sl, active, dev)  # the group travels with the data, built once per micro-batch
        attach_spec(psp, self.recompute.spec_for(recompute_mode))  # so does the micro-batch's recomputation
        input_ids = sl.input_ids.to(dev)
        labels = sl.labels.to(dev)
        loss_mask = sl.loss_mask.to(dev)
        position_ids = sl.position_ids.to(dev)

        self._sync()
        if dev.type == "cuda":  # the peak of this micro-batch alone: evidence for the memory model
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with self._autocast(), torch.no_grad() if forward_only else contextlib.nullcontext():
            token_losses = self.model(input_ids, position_ids, None, labels=labels, packed_seq_params=psp)
        local_sum = loss_mod.masked_loss_sum(token_losses, loss_mask)
        self._sync()
        t1 = time.perf_counter()
        if not forward_only:
            (local_sum / float(global_tokens)).backward()
            self._sync()
        t2 = time.perf_counter()
        tokens = int(sl.local_tokens)
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
        return {
            "loss_sum": local_sum.detach(),
            "tokens": tokens,
            "slice_tokens": int(input_ids.numel()),
            "fwd_ms": (t1 - t0) * 1e3,
            "bwd_ms": (t2 - t1) * 1e3,
            "peak_mb": peak_mb,
        }

    def run(
        self, plan: Plan, sequences: Sequence[Tensor], *, gather_stats: bool = False, forward_only: bool = False
    ) -> StepResult:
        """Forward + backward of every micro-batch of ``plan`` on this rank (collective over all ranks).

        ``forward_only``: evaluation (model in eval mode, no autograd graph, gradients untouched);
        the loss is the same global token mean.
        """
        self.validate(plan, sequences)
        global_tokens = loss_mod.global_batch_tokens(plan.lengths)
        was_training = self.model.training
        self.model.train(not forward_only)
        try:
            return self._run(plan, sequences, global_tokens, gather_stats, forward_only)
        finally:
            self.model.train(was_training)

    def _run(
        self, plan: Plan, sequences: Sequence[Tensor], global_tokens: int, gather_stats: bool, forward_only: bool
    ) -> StepResult:
        totals = {"tokens": 0, "slice_tokens": 0, "fwd_ms": 0.0, "bwd_ms": 0.0, "a2a_ms": 0.0, "a2a_bytes": 0}
        loss_parts: list[Tensor] = []  # summed once at the end: no device sync per micro-batch
        per_mb: list[dict[str, Any]] = []
        for m, mb in enumerate(plan.micro_batches):
            g = mb.group_of(self.unit)  # groups are unit groups (units = ranks at TP 1)
            seqs = [sequences[i] for i in g.sequences]
            self._a2a_reset()
            with sp_group(self.pool, self.pool.members(g.ranks)) as active:
                r = self._forward_backward(seqs, active, global_tokens, forward_only, g.recompute)
            r["a2a_ms"], r["a2a_bytes"] = self._a2a_read()  # a recomputed attention's exchanges included
            r.update(
                micro_batch=m,
                ranks=list(g.ranks),
                degree=g.degree,
                sequences=list(g.sequences),
                empty_group=not seqs,
                recompute=self.recompute.spec_for(g.recompute).mode,
            )
            per_mb.append(r)
            loss_parts.append(r.pop("loss_sum"))
            for k in totals:
                totals[k] += r[k]
        if self.sync_grads and self.sharding_mode == "ddp" and not forward_only:
            finish_grad_sync(self.model)
        loss_sum = float(torch.stack(loss_parts).double().sum().item())
        loss = loss_mod.all_reduce_loss(loss_sum, global_tokens, group=self.loss_group)  # each token once
        stats = dict(
            totals,
            rank=self.rank,
            micro_batches=len(plan.micro_batches),
            padded_tokens=totals["slice_tokens"] - totals["tokens"],
        )
        all_stats = None
        if gather_stats:
            all_stats = [None] * self.world_size
            dist.all_gather_object(all_stats, stats)
        return StepResult(
            loss=loss, num_tokens=global_tokens, stats=stats, all_stats=all_stats, micro_batch_stats=per_mb
        )
