"""The cost model a run starts from: the user's profile or preset when it fits the model, else an analytic prior.

Why: the planner needs a cost model from the first batch, but a profile is made for one model
shape on one cluster. A model whose shape differs from the given (or default) cost model used to
stop with "cost model ... was made for 4 attention heads"; now it starts from the planner's
analytic prior (``planner.prior``: FLOPs and all-to-all bytes from the shape) scaled by this
device's measured matmul throughput, says so in one log line, and the online calibration refits
the coefficients from the executor's measurements within a few iterations.

Everything that decides *validity* (allowed degrees, memory capacity) is deterministic here, so
every rank reaches the same verdict before any process group exists; only the compute speed is
measured (a second of matmuls), and only rank 0's model is ever used for planning.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass

import torch

from megatron.flexsp.planner.costmodel import CostModel, CostModelError
from megatron.flexsp.planner.presets import load_cost_model
from megatron.flexsp.planner.prior import ModelShape, analytic_cost_model, with_recompute_modes
from megatron.flexsp.planner.tensor_parallel import check_tensor_parallel, unit_cost_model, unit_size

from .arguments import ArgumentError
from .distributed import set_local_device

__all__ = [
    "ResolvedCostModel",
    "resolve_cost_model",
    "measure_matmul_flops",
    "shape_mismatch",
    "with_run_recompute",
    "tensor_parallel_units",
    "DEFAULT_CPU_PRESET",
]

log = logging.getLogger("flexsp.train")

DEFAULT_CPU_PRESET = "cpu-tiny"
# Link guesses for the prior (GB/s per rank); calibration replaces them with measured effective values.
_LINKS = {"cuda": (150.0, 20.0), "cpu": (1.0, 0.05)}
# Share of a large matmul's throughput that a small model's kernels reach (the prior's efficiency).
_EFFICIENCY = {"cuda": 0.5, "cpu": 0.3}


@dataclass(frozen=True)
class ResolvedCostModel:
    """The starting cost model and where it came from (``note`` is logged once at start-up)."""

    cost: CostModel
    source: str  # "file", "preset" or "prior"
    note: str


def shape_mismatch(cost: CostModel, args: argparse.Namespace) -> str | None:
    """Why ``cost`` was not made for this model (layers, hidden size, heads, query groups), or None. A unit
    cost model (a calibrated one saved at TP t) holds heads / t and query groups / t per unit."""
    t = unit_size(cost)
    for field, flag in (
        ("num_layers", "num_layers"),
        ("hidden_size", "hidden_size"),
        ("num_attention_heads", "num_attention_heads"),
        ("num_query_groups", "num_query_groups"),
    ):
        want, have = getattr(args, flag), getattr(cost, field)
        if have is not None and field in ("num_attention_heads", "num_query_groups"):
            have *= t
        if have is not None and want != have:
            return f"it was made for {field.replace('_', ' ')} {have}, the model has {want}"
    return None


def measure_matmul_flops(device: torch.device, seconds: float = 0.5, size: int = 512) -> float:
    """FLOP/s of repeated square matmuls on ``device`` (bf16 on CUDA, fp32 on the CPU), about ``seconds`` long."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            a @ b
        n += 4
        sync()
    return 2.0 * size**3 * n / (time.perf_counter() - t0)


def _memory_limit_gb(device: torch.device, local_ranks: int) -> float:
    """Usable memory per rank: 90% of the GPU, or on the CPU half of the node's RAM split over its ranks.

    MemTotal, not MemAvailable: every rank must compute the same capacity.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory * 0.9 / 2**30
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kb / 2**20 / 2 / max(1, local_ranks)


def _prior(
    args: argparse.Namespace, vocab_size: int, world_size: int, local_ranks: int, device: torch.device
) -> CostModel:
    kind = "cuda" if device.type == "cuda" else "cpu"
    flops = measure_matmul_flops(
        device, seconds=0.5 if kind == "cpu" else 0.2, size=max(256, min(4096, args.hidden_size * 4))
    )
    intra, inter = _LINKS[kind]
    return analytic_cost_model(
        _shape(args, vocab_size),
        device_flops=flops,
        efficiency=_EFFICIENCY[kind],
        intra_node_gbs=intra,
        inter_node_gbs=inter,
        limit_gb=_memory_limit_gb(device, local_ranks),
        gpus_per_node=min(local_ranks, world_size),
        world_size=world_size,
        bytes_per_element=2 if args.bf16 else 4,
        sharding="ddp" if args.flexsp_sharding == "ddp" else "zero3",
        recompute_modules=_recompute_modules(args),
    )


def _shape(args: argparse.Namespace, vocab_size: int) -> ModelShape:
    """The model as the prior sees it; tied embeddings (Megatron's default) hold V h parameters once."""
    return ModelShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        swiglu=bool(args.swiglu),
        tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
    )


def _recompute_modules(args: argparse.Namespace) -> tuple[str, ...]:
    """What selective recomputation recomputes (--recompute-modules; Megatron's default core_attn)."""
    return tuple(getattr(args, "recompute_modules", None) or ("core_attn",))


def with_run_recompute(cost: CostModel, args: argparse.Namespace, vocab_size: int) -> tuple[CostModel, str]:
    """``cost`` ready for the run's --recompute-granularity: the modes the planner may use that the cost model
    lacks come from the analytic prior of the model's shape, scaled to its measured activations
    (``prior.with_recompute_modes``); (model, a note for the start-up log, empty when nothing was added)."""
    mode = getattr(args, "recompute_granularity", None) or "none"
    need = {"none": (), "selective": ("selective",), "full": ("full",), "auto": ("selective", "full")}[mode]
    missing = [m for m in need if m not in cost.modes]
    if not missing:
        return cost, ""
    e = 2 if args.bf16 else 4
    out = with_recompute_modes(cost, _shape(args, vocab_size), e=e, modules=_recompute_modules(args))
    return out, f"; recompute {', '.join(missing)} derived from the model shape (analytic prior)"


def tensor_parallel_units(
    start: ResolvedCostModel, args: argparse.Namespace, *, world_size: int, local_ranks: int
) -> ResolvedCostModel:
    """At --tensor-model-parallel-size t > 1, the model of one unit of t ranks (``planner.tensor_parallel``), so
    the planner hook, the baselines and the calibration all work over world/t units; at t = 1, ``start``.

    Why here: the TP group must lie in one node, and both the launch (LOCAL_WORLD_SIZE) and the cost model
    say what a node is; the checks name the first thing that makes t impossible (ArgumentError, exit 2)."""
    t, made_for = args.tensor_model_parallel_size, unit_size(start.cost)
    if made_for != 1:  # a unit model already (e.g. --flexsp-save-calibrated of a TP run): only at its own t
        if made_for != t:
            raise ArgumentError(
                f"cost model '{start.cost.name}' is over units of TP {made_for}, the run has "
                f"--tensor-model-parallel-size {t}: give the per-GPU cost model"
            )
        return start
    if t == 1:
        return start
    if local_ranks % t and local_ranks < world_size:
        raise ArgumentError(
            f"--tensor-model-parallel-size {t} does not divide the {local_ranks} ranks per node: a TP group "
            "must lie in one node"
        )
    sp = bool(getattr(args, "sequence_parallel", False))
    try:
        check_tensor_parallel(start.cost, t, world_size)
        unit = unit_cost_model(start.cost, t, sequence_parallel=sp)
    except CostModelError as e:
        raise ArgumentError(f"--tensor-model-parallel-size {t} with cost model '{start.cost.name}': {e}") from None
    note = f"{start.note}; planned over {world_size // t} units of {t} ranks (tensor parallel{', SP' if sp else ''})"
    return ResolvedCostModel(unit, start.source, note)


def resolve_cost_model(
    args: argparse.Namespace,
    *,
    world_size: int,
    local_ranks: int,
    cuda: bool,
    vocab_size: int,
    local_rank: int = 0,
) -> ResolvedCostModel:
    """The run's starting cost model: --flexsp-cost-model (file or preset) if it fits the model, else the prior.

    Without --flexsp-cost-model the CPU default preset is used when it fits; on GPU there is no
    default profile, so the prior starts the run. A file or preset that cannot be read is an error.
    ``local_rank`` picks the GPU the prior's benchmark runs on; it is bound before any CUDA call.
    """
    spec = args.flexsp_cost_model or (None if cuda else DEFAULT_CPU_PRESET)
    why = "no --flexsp-cost-model given"
    if spec is not None:
        try:
            cost = load_cost_model(spec, world_size)
        except CostModelError as e:
            raise ArgumentError(f"--flexsp-cost-model {spec}: {e}") from None
        mismatch = shape_mismatch(cost, args)
        if mismatch is None:
            source = "file" if os.path.exists(spec) else "preset"
            cost, note = with_run_recompute(cost, args, vocab_size)
            return ResolvedCostModel(cost, source, f"cost model '{cost.name}' ({source} {spec}){note}")
        why = f"cost model '{cost.name}' does not fit: {mismatch}"
        if args.flexsp_cost_model is None:
            why = f"the default CPU preset '{spec}' does not fit: {mismatch}"
    device = set_local_device(local_rank) if cuda else torch.device("cpu")
    try:
        cost = _prior(args, vocab_size, world_size, local_ranks, device)
    except CostModelError as e:
        raise ArgumentError(f"analytic cost model: {e}") from None
    return ResolvedCostModel(
        cost,
        "prior",
        f"{why}; starting from an analytic prior ({cost.name}), calibrated online from the measured micro-batches",
    )
