"""Model states over all ranks: ZeRO-3 with torch FSDP2, or plain data parallel; gradients SUMMED.

Why: FlexSP moves a rank from one SP group to another between micro-batches, so no rank may own
a fixed slice of the model tied to a group; the model states are sharded (FSDP2) or replicated
(small models) over *all* ranks. The loss already divides by the tokens of the whole global batch
(runtime.loss), so the gradient reduction must be a plain SUM over ranks, not FSDP's default
average.

Both modes work on gloo (CPU) and NCCL. Every rank must run the same number of forward/backward
passes (the executor runs every micro-batch on every rank), because FSDP2 all-gathers and
reduce-scatters per layer.

Tensor parallelism (issue 20): a model built with ``tensor_model_parallel_size`` t holds one TP
partition per rank. The ranks form a 2-D mesh (units x TP: rank r at [r // t, r % t], megatron's
layout); FSDP2 shards each TP partition over the "dp" dimension, the ranks with the same TP rank,
and gradients are summed over the units only (summing over TP ranks would add different
partitions' gradients). Parameters TP replicates (norms, row-parallel biases) see the same input
on the t ranks of a unit without TP-sequence parallelism, so their gradients are already equal
there. Plain data parallel likewise all-reduces over the same-TP-rank ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "MODES",
    "shard_model",
    "finish_grad_sync",
    "sharding_mode_of",
    "broadcast_params",
    "full_state_dict",
    "tensor_parallel_grad_norm",
    "gather_tensor_parallel",
    "split_tensor_parallel",
    "tensor_parallel_layout",
]

MODES = ("fsdp2", "ddp")


def _transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a megatron GPTModel (model.decoder.layers), else top-level children."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is not None and len(layers):
        return list(layers)
    raise TypeError(f"shard_model: {type(model).__name__} has no decoder.layers (expected a megatron GPTModel)")


def broadcast_params(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy the parameters and buffers of rank ``src`` of ``group`` to its ranks (one collective per tensor).

    ``src`` is the rank inside ``group`` (the same as the global rank for the world).
    """
    root = src if group is None else dist.get_global_rank(group, src)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=root, group=group)


def _tp_size(model: nn.Module) -> int:
    return int(getattr(getattr(model, "_flexsp_cfg", None), "tensor_model_parallel_size", 1) or 1)


def _data_parallel_group(model: nn.Module, group):
    """The group gradients are summed over: ``group`` if given, else the same-TP-rank ranks at TP > 1."""
    if group is not None or _tp_size(model) == 1:
        return group
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _device_mesh(device_type: str, group, tp: int = 1):
    """1-D mesh over ``group`` (default: the world); at TP > 1 the "dp" slice of the units x TP mesh."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if tp > 1:
        from megatron.core import parallel_state as ps

        layout = torch.arange(dist.get_world_size()).view(-1, tp)  # row u: unit u's ranks (megatron's TP groups)
        mesh = DeviceMesh.from_group(
            [group, ps.get_tensor_model_parallel_group()], device_type, mesh=layout, mesh_dim_names=("dp", "tp")
        )
        return mesh["dp"]
    if group is None:
        return init_device_mesh(device_type, (dist.get_world_size(),))
    return DeviceMesh.from_group(group, device_type)


def shard_model(
    model: nn.Module,
    mode: str = "fsdp2",
    *,
    group=None,
    sync_params: bool = True,
    reshard_after_forward: bool = True,
    mp_policy=None,
) -> nn.Module:
    """Apply ``mode`` to ``model`` in place and return it.

    * ``fsdp2``: ``fully_shard`` each transformer layer, then the root (embeddings, final norm,
      output layer), over all ranks of ``group`` (default: the world); gradient divide factor 1
      and sum-only reductions, so gradients are summed over ranks.
    * ``ddp``: parameters stay replicated; call ``finish_grad_sync(model)`` after the last
      backward of the step to all-reduce (SUM) the gradients.

    At TP > 1 ``group`` defaults to the ranks with this rank's TP rank (module docstring).
    ``sync_params`` broadcasts the group's first rank's weights first (a cheap guard: build_gpt_model already
    gives identical weights for the same seed). ``mp_policy`` is an optional FSDP2
    MixedPrecisionPolicy; by default a model built with ``GPTConfig.bf16`` computes in bf16 and
    reduces gradients in fp32.
    """
    if mode not in MODES:
        raise ValueError(f"sharding mode must be one of {MODES}, got {mode!r}")
    if not dist.is_initialized():
        raise RuntimeError("shard_model: torch.distributed is not initialised")
    if getattr(model, "_flexsp_sharding", None) is not None:
        raise RuntimeError(f"shard_model: model is already sharded ({model._flexsp_sharding})")
    tp = _tp_size(model)
    # megatron marks TP-split parameters; FSDP2 replaces the parameters but keeps their names
    model._flexsp_tp_layout = _tp_layout(model)
    explicit = group is not None
    group = _data_parallel_group(model, group)
    if sync_params:
        broadcast_params(model, group=group)
    if mode == "ddp":
        model._flexsp_sharding = "ddp"
        model._flexsp_group = group
        return model

    _fully_shard(
        model,
        _device_mesh(next(model.parameters()).device.type, group, tp if not explicit else 1),
        reshard_after_forward,
        mp_policy,
    )
    model._flexsp_sharding = "fsdp2"
    model._flexsp_group = group
    return model


def _fully_shard(model: nn.Module, mesh, reshard_after_forward: bool, mp_policy) -> None:
    """FSDP2 over ``mesh``: each transformer layer, then the root; gradients summed, not averaged."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    cfg = getattr(model, "_flexsp_cfg", None)
    if mp_policy is None and cfg is not None and getattr(cfg, "bf16", False):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # cast_forward_inputs=False: the layers' float inputs include RoPE frequencies
        # (position x inv_freq), which must stay fp32 (bf16 angles are off by radians at
        # long positions); hidden states are bf16 anyway, coming from bf16 parameters.
        mp_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for layer in _transformer_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    _sum_gradients(model)


def _sum_gradients(model: nn.Module) -> None:
    """Make every FSDP2 unit reduce gradients by plain SUM (divide factor 1).

    ``set_force_sum_reduction_for_comms`` (torch >= 2.8) keeps the collective a ReduceOp.SUM
    (gloo has no PREMUL_SUM); older torch names the factor setter
    ``set_reduce_scatter_divide_factor``.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
        elif hasattr(m, "set_reduce_scatter_divide_factor"):
            m.set_reduce_scatter_divide_factor(1.0)
        else:
            raise RuntimeError("this torch's FSDP2 cannot set a gradient divide factor; torch >= 2.6 is needed")
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)


def sharding_mode_of(model: nn.Module) -> str | None:
    return getattr(model, "_flexsp_sharding", None)


def _grads_for_sync(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must contribute the same tensors: a missing grad is zeros
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def finish_grad_sync(model: nn.Module, bucket_numel: int = 1 << 25) -> None:
    """Plain data parallel: all-reduce (SUM) every gradient over the group.

    Gradients are flattened into buckets of at most ``bucket_numel`` elements per (dtype,
    device), one collective per bucket, in parameter order (the same on every rank).
    A no-op for FSDP2 models (their backward already reduce-scattered the gradients).
    """
    mode = sharding_mode_of(model)
    if mode == "fsdp2":
        return
    if mode != "ddp":
        raise RuntimeError("finish_grad_sync: model was not prepared with shard_model(model, 'ddp')")
    group = getattr(model, "_flexsp_group", None)
    buckets: list[list[torch.Tensor]] = []
    open_bucket: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[int]]] = {}
    for g in _grads_for_sync(model.parameters()):
        key = (g.dtype, g.device)
        if key not in open_bucket or open_bucket[key][1][0] + g.numel() > bucket_numel:
            open_bucket[key] = ([], [0])
            buckets.append(open_bucket[key][0])
        open_bucket[key][0].append(g)
        open_bucket[key][1][0] += g.numel()
    for gs in buckets:
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        off = 0
        for g in gs:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copy of the parameters, the same on every rank (collective for FSDP2).

    At TP > 1 the TP partitions are joined too (``gather_tensor_parallel``): the 1-process model's tensors.
    """
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.cpu().clone()
    return gather_tensor_parallel(out, model)


def tensor_parallel_grad_norm(model: nn.Module, max_norm: float, norm_of: Callable[..., float]) -> float:
    """The whole model's gradient L2 norm, each parameter once; clipped to ``max_norm`` (> 0) like ``norm_of``.

    Why: at TP > 1 a rank holds one partition of the split parameters and a whole copy of the
    replicated ones (norms), so the norm of its own gradients is neither the model's nor the same
    on every rank, and clipping by it would change the training. The split parameters' squares
    are summed over the TP group, the replicated ones counted once (megatron's rule).
    ``norm_of(params, max_norm)`` is the trainer's clip function (norm over all ranks' shards,
    ``max_norm <= 0`` only measures); at TP 1 it does all the work.
    """
    tp = _tp_size(model)
    if tp == 1:
        return norm_of(model.parameters(), max_norm)
    from megatron.core import parallel_state as ps

    split = _tp_layout(model)
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    part = [p for n, p in named if n in split]
    whole = [p for n, p in named if n not in split]
    dev = next(model.parameters()).device
    sq = torch.tensor([norm_of(part, 0.0) ** 2], dtype=torch.float64, device=dev)
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=ps.get_tensor_model_parallel_group())
    total = math.sqrt(float(sq.item()) + norm_of(whole, 0.0) ** 2)
    if max_norm > 0:
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for _, p in named:
                p.grad.mul_(coef)
    return total


def _tp_layout(model: nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (partition dim, stride) of every TP-split parameter (recorded by shard_model, else read now)."""
    layout = getattr(model, "_flexsp_tp_layout", None)
    if layout is None:
        layout = {
            n: (int(p.partition_dim), int(getattr(p, "partition_stride", 1)))
            for n, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)
        }
    return layout


def tensor_parallel_layout(model: nn.Module) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(t, this rank's TP rank, name -> (partition dim, stride) of the split parameters); (1, 0, {}) at TP 1.
    What a checkpoint needs to store the partitions as parts of the whole tensors."""
    t = _tp_size(model)
    if t == 1:
        return 1, 0, {}
    from megatron.core import parallel_state as ps

    return t, ps.get_tensor_model_parallel_rank(), _tp_layout(model)


def gather_tensor_parallel(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (TP 1) tensors of ``state``, this rank's TP partitions of ``model``: a checkpoint then
    holds the model as a 1-process run would, whatever t (collective over the TP group).

    Megatron splits a tensor into t * stride chunks along its partition dim and gives TP rank j the
    chunks j, j + t, ... (stride 2: SwiGLU's FC1 keeps its gate and up halves per rank), so the
    whole tensor is, for each of the stride blocks, the ranks' pieces of that block in rank order.
    """
    if _tp_size(model) == 1:
        return dict(state)
    from megatron.core import parallel_state as ps

    group, t = ps.get_tensor_model_parallel_group(), _tp_size(model)
    layout, out = _tp_layout(model), {}
    for name in sorted(state):  # the same order on every rank of the TP group
        part = state[name]
        if name not in layout:
            out[name] = part
            continue
        dim, stride = layout[name]
        parts = [torch.empty_like(part) for _ in range(t)]
        dist.all_gather(parts, part.contiguous(), group=group)
        pieces = [p.chunk(stride, dim=dim) for p in parts]
        out[name] = torch.cat([pieces[j][k] for k in range(stride) for j in range(t)], dim=dim)
    return out


def split_tensor_parallel(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """This TP rank's partitions of whole (TP 1) tensors: the inverse of ``gather_tensor_parallel`` (local)."""
    t = _tp_size(model)
    if t == 1:
        return dict(state)
    from megatron.core import parallel_state as ps

    j, layout = ps.get_tensor_model_parallel_rank(), _tp_layout(model)
    out = {}
    for name, full in state.items():
        if name in layout:
            dim, stride = layout[name]
            full = torch.cat(full.chunk(t * stride, dim=dim)[j::t], dim=dim)
        out[name] = full
    return out
