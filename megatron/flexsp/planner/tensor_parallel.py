"""Tensor parallelism for the planner: plan over units of t GPUs exactly as over GPUs.

Why a transform rather than a second planner: with ``--tensor-model-parallel-size t`` the ranks
form N/t *units* (t consecutive ranks inside one node, one TP group each). An SP group of degree
d is d whole units; inside it, the GPUs of the same TP rank run the Ulysses all-to-all over their
heads/t heads. Every solver, baseline and bound already plans over interchangeable ranks, so the
cost of a unit is expressed as a cost model in the paper form and the planner runs unchanged over
N/t "ranks". Baselines (static, Megatron's hybrid and dynamic CP) plan over the same units, so
every comparison stays like for like. Plans record ``tensor_parallel_size``; group ``ranks`` are
unit indices (rank r belongs to unit r // t).

The unit model, from the per-GPU model at t = 1 (``e`` bytes per element, ``L`` layers, ``h``
hidden; Megatron's TP: column-parallel QKV and FC1, row-parallel output and FC2):

* compute: the matmuls and attention split over t GPUs: ``alpha1 / t``, ``alpha2 / t``; plus the
  TP all-reduces, linear in the tokens a unit holds: per layer two in forward (after the
  attention output and FC2) and two in backward (input gradients of QKV and FC1), each of ``h e``
  bytes per token; a ring all-reduce moves ``2 (t-1)/t`` of its buffer over the GPU's link, so
  ``alpha2 += 4 L h e * 2 (t-1)/t / allreduce_bw``. (The vocab-parallel embedding and loss
  all-reduces are per token and small next to L layers; left out.) ``beta1 / t``: beta1 stands
  for the per-micro-batch ZeRO-3 traffic (the prior's formula ``3 P e (n-1)/n`` over the slowest
  link, the bulk of a measured beta1 at 7B and up); at TP t each GPU gathers and reduce-scatters
  only its TP partition, ``P / t``, over the same kind of link (one GPU per node and unit when
  t = gpus_per_node), so the traffic per GPU is ``1/t`` of it. (A profile at t measures it.)
* all-to-all: each GPU exchanges its heads/t heads, ``bytes_per_token / t``; the d units of a
  group span d t GPUs, whose links are the ones the per-GPU table measured for degree ``d t``.
  The table's bandwidths are effective ones (the prior's form: link * n/(n-1) inside a node,
  link * n/(n-g) across nodes, for the share a rank sends away). Across nodes a unit sends the
  same share, (d - g/t)/d = (d t - g)/(d t), so ``bandwidth[d] = bandwidth_per_gpu[d t]``;
  inside a node it sends (d-1)/d instead of (d t - 1)/(d t), so the link is read back and
  rescaled: ``bandwidth_per_gpu[d t] * (d t - 1)/(d t) * d/(d - 1)``. Degrees without a
  per-GPU bandwidth at d t are not allowed.
* memory: model states are unchanged per GPU (FSDP shards each TP partition over the N/t units:
  16 P / t / (N / t) = 16 P / N); activations per token follow Korthikanti et al. (2022,
  "Reducing Activation Recomputation in Large Transformer Models", Table 2): without
  TP-sequence parallelism 10 of the 34 per-layer units stay replicated (norm inputs, the inputs
  of the column-parallel linears, dropout masks), so ``act * (10 + 24 / t) / 34``; with
  ``--sequence-parallel`` everything splits, ``act / t``. Recompute modes (the optional "recompute"
  key): "selective" (core attention, MLP) scales like "none"; "full" keeps mostly each layer's input
  (2sbh per layer in Korthikanti's count), which only ``--sequence-parallel`` splits: ``/ t`` with it,
  unscaled without it (an upper bound: its one recreated layer and the vocab-parallel logits do
  split). Their compute and all-to-all factors are kept (a recomputed forward re-runs its TP
  all-reduces too, in proportion).
* shape: ``num_attention_heads / t`` heads and ``num_query_groups / t`` kv groups per GPU
  (Megatron splits GQA's kv heads over TP first and needs both divisible by t),
  ``gpus_per_node / t`` units per node.

The all-reduce bandwidth comes from the cost-model JSON's optional additive section
``"tensor_parallel": {"allreduce_bandwidth_gbs": {"2": GB/s, ...}}`` (bus bandwidth per GPU,
measured by ``flexsp-profile --tensor-model-parallel-size t``); without it, the GPU's intra-node
link is read back from the all-to-all table at degree t (``bw[t] * (t-1)/t``, the prior's form).
"""

from __future__ import annotations

import copy
from typing import Any

from .costmodel import CostModel, CostModelError

__all__ = [
    "REPLICATED_ACTIVATION_SHARE",
    "allreduce_bandwidth",
    "check_tensor_parallel",
    "unit_cost_model",
    "unit_gpu_ranks",
    "unit_size",
]

REPLICATED_ACTIVATION_SHARE = 10 / 34  # Korthikanti et al. 2022: replicated share without TP-sequence parallel
_GBS_TO_MODEL = 1e9 / 1000.0 / 2**20  # 1 GB/s in the cost model's units (2^20 bytes per ms)


def check_tensor_parallel(cost: CostModel, tp: int, world_size: int | None = None) -> None:
    """Raise CostModelError naming the first thing that makes ``tp`` impossible for ``cost``."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise CostModelError(f"tensor-model-parallel size must be a positive integer, got {tp!r}")
    g = cost.gpus_per_node
    if world_size is not None and world_size % tp:
        raise CostModelError(f"tensor-model-parallel size {tp} does not divide the world size {world_size}")
    made = unit_size(cost)  # a unit model (e.g. a calibrated one saved by a TP run) serves its own t only
    if made == tp:
        return
    if made != 1:
        raise CostModelError(f"cost model '{cost.name}' is over units of TP {made}, not {tp}: give the per-GPU model")
    if g % tp:
        raise CostModelError(
            f"tensor-model-parallel size {tp} does not divide gpus_per_node {g}: a TP group must lie in one node"
        )
    if cost.num_attention_heads % tp:
        raise CostModelError(
            f"tensor-model-parallel size {tp} does not divide num_attention_heads {cost.num_attention_heads}"
        )
    if cost.num_query_groups % tp:
        raise CostModelError(
            f"tensor-model-parallel size {tp} does not divide num_query_groups {cost.num_query_groups}"
        )


def unit_size(cost: CostModel) -> int:
    """The t of a unit cost model made by ``unit_cost_model`` (1 for a per-GPU model): plans and validators
    read it so that a plan over units is never checked against the per-GPU shape by mistake."""
    section = cost.extra.get("tensor_parallel_unit")
    return int(section["size"]) if isinstance(section, dict) and "size" in section else 1


def unit_gpu_ranks(units: list[int], tp: int) -> list[int]:
    """The GPU ranks of a plan group's units (contract C6): unit u holds ranks u t .. u t + t - 1."""
    return [u * tp + j for u in units for j in range(tp)]


def _bytes_per_element(cost: CostModel) -> float:
    """e, read back from the all-to-all volume ``2 L (2h + 2h g/a) e`` (costmodel.alltoall_bytes_per_token)."""
    h, L = cost.hidden_size, cost.num_layers
    per_layer = 2 * h + 2 * h * cost.num_query_groups / cost.num_attention_heads
    return cost.alltoall.bytes_per_token / (2 * L * per_layer)


def allreduce_bandwidth(cost: CostModel, tp: int) -> float:
    """The TP all-reduce's per-GPU link bandwidth in model units (2^20 B/ms); see the module docstring."""
    section = cost.extra.get("tensor_parallel")
    if section is not None:
        table = section.get("allreduce_bandwidth_gbs") if isinstance(section, dict) else None
        if not isinstance(table, dict):
            raise CostModelError("cost model: 'tensor_parallel.allreduce_bandwidth_gbs' must be an object {t: GB/s}")
        value = table.get(str(tp), table.get(tp))
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise CostModelError(
                    f"cost model: 'tensor_parallel.allreduce_bandwidth_gbs.{tp}' must be > 0, got {value!r}"
                )
            return float(value) * _GBS_TO_MODEL
    if tp not in cost.alltoall.bandwidth_gbs:
        raise CostModelError(
            f"cost model '{cost.name}': no all-reduce bandwidth for tensor-model-parallel size {tp} "
            f"(add 'tensor_parallel.allreduce_bandwidth_gbs.{tp}' or an all-to-all bandwidth for degree {tp})"
        )
    return cost.alltoall.bandwidth_gbs[tp] * (tp - 1) / tp


def _scale_recompute(d: dict[str, Any], act_scale: float, sequence_parallel: bool) -> None:
    """Scale the optional per-recompute-mode activation coefficients (module docstring): selective like
    "none"; full keeps mostly each layer's input, which only TP-sequence parallelism splits."""
    modes = d.get("recompute")
    if isinstance(modes, dict):
        for name, mode in modes.items():
            if isinstance(mode, dict) and "activation_mb_per_token" in mode:
                scale = 1.0 if name == "full" and not sequence_parallel else act_scale
                mode["activation_mb_per_token"] = mode["activation_mb_per_token"] * scale


def _unit_bandwidths(cost: CostModel, tp: int) -> dict[int, float]:
    """Effective all-to-all bandwidth per unit degree d >= 2 (module docstring)."""
    out: dict[int, float] = {}
    for n, value in cost.alltoall.bandwidth_gbs.items():
        d = n // tp
        if n % tp or d < 2:
            continue
        out[d] = value * (n - 1) / n * d / (d - 1) if n <= cost.gpus_per_node else value
    return out


def unit_cost_model(cost: CostModel, tp: int, *, sequence_parallel: bool = False) -> CostModel:
    """The cost model of one unit of ``tp`` GPUs (module docstring); ``tp == 1`` or a unit model of ``tp``
    already returns ``cost`` (never divided twice)."""
    check_tensor_parallel(cost, tp)
    if tp == 1 or unit_size(cost) == tp:
        return cost
    d = copy.deepcopy(cost.to_dict())
    e = _bytes_per_element(cost)
    allreduce_bytes_per_token = 4 * cost.num_layers * cost.hidden_size * e * 2 * (tp - 1) / tp
    allreduce_ms_per_token = allreduce_bytes_per_token / 2**20 / allreduce_bandwidth(cost, tp)
    d["compute"]["alpha1_ms_per_token2"] = cost.compute.alpha1_ms_per_token2 / tp
    d["compute"]["alpha2_ms_per_token"] = cost.compute.alpha2_ms_per_token / tp + allreduce_ms_per_token
    d["compute"]["beta1_ms"] = cost.compute.beta1_ms / tp
    bw = _unit_bandwidths(cost, tp)
    if not bw:  # units never form an SP group of 2+ (e.g. one node, t = gpus_per_node): any value; never used
        bw = {2: cost.bandwidth(max(cost.alltoall.bandwidth_gbs))}
    d["alltoall"] = {
        "bytes_per_token": cost.alltoall.bytes_per_token / tp,
        "bandwidth_gbs": {str(k): v for k, v in sorted(bw.items())},
    }
    share = 0.0 if sequence_parallel else REPLICATED_ACTIVATION_SHARE
    act_scale = share + (1 - share) / tp
    d["memory"]["activation_mb_per_token"] = cost.memory.activation_mb_per_token * act_scale
    _scale_recompute(d, act_scale, sequence_parallel)
    d["num_attention_heads"] = cost.num_attention_heads // tp
    d["num_query_groups"] = cost.num_query_groups // tp
    d["gpus_per_node"] = cost.gpus_per_node // tp
    d["name"] = f"{cost.name} [units of TP {tp}{', sequence parallel' if sequence_parallel else ''}]"
    d["tensor_parallel_unit"] = {"size": tp, "sequence_parallel": sequence_parallel}
    return CostModel.from_dict(d)
