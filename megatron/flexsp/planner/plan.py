"""The plan of one global batch (fixed JSON form of DESIGN.md), its estimate and its validator.

A plan is the only thing that crosses from the planner to the runtime: which micro-batches run,
and in each, which ranks form which SP group and which sequences (indices into ``lengths``)
that group processes.

Tensor parallelism (contract C6): a plan made at TP t records ``tensor_parallel_size: t``
(written only when t > 1; absent reads as 1). Its ``world_size`` stays the number of GPUs N,
but group ``ranks`` are *unit* indices 0..N/t-1: rank r is in unit r // t with TP rank r % t,
because the planner plans over N/t units exactly as over GPUs (planner/tensor_parallel.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .costmodel import CostModel, CostModelError
from .recompute import MODES
from .tensor_parallel import unit_cost_model, unit_size

__all__ = [
    "PlanError",
    "NoFeasiblePlanError",
    "Group",
    "MicroBatch",
    "SolverInfo",
    "Plan",
    "estimate_plan_ms",
    "validate_plan",
]


class PlanError(ValueError):
    """A plan that breaks an invariant; the message says which and where."""


class NoFeasiblePlanError(PlanError):
    """No valid plan exists: some sequences fit in no allowed SP group on this world size.

    ``lengths`` are the offending lengths, ``max_capacity`` the token capacity of the largest
    allowed group (``max_degree``).
    """

    def __init__(
        self, lengths: Sequence[int], max_capacity: int, max_degree: int, world_size: int, detail: str = ""
    ) -> None:
        self.lengths = [int(x) for x in lengths]
        self.max_capacity = int(max_capacity)
        self.max_degree = int(max_degree)
        self.world_size = int(world_size)
        self.detail = detail
        shown = ", ".join(str(x) for x in self.lengths[:16]) + (" ..." if len(self.lengths) > 16 else "")
        msg = (
            f"no feasible plan on {world_size} ranks: {len(self.lengths)} sequence(s) of length(s) [{shown}] "
            f"exceed the largest group capacity {self.max_capacity} tokens (degree {self.max_degree})"
        )
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)

    def __reduce__(self):  # picklable across the planner's background process
        return (type(self), (self.lengths, self.max_capacity, self.max_degree, self.world_size, self.detail))


@dataclass
class Group:
    """One SP group of a micro-batch; ``recompute`` is its activation recomputation ("none", "selective" or
    "full"), written to JSON only when not "none" so that plans without recomputation read as before."""

    ranks: list[int]
    sequences: list[int] = field(default_factory=list)
    recompute: str = "none"

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ranks": list(self.ranks), "sequences": list(self.sequences)}
        if self.recompute != "none":
            d["recompute"] = self.recompute
        return d


@dataclass
class MicroBatch:
    groups: list[Group]

    def group_of(self, rank: int) -> Group:
        """The group containing ``rank`` (each rank is in exactly one group of a valid plan)."""
        for g in self.groups:
            if rank in g.ranks:
                return g
        raise PlanError(f"rank {rank} is in no group of this micro-batch")

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups]}


@dataclass
class SolverInfo:
    method: str
    status: str = "unknown"
    solve_time_s: float = 0.0
    lower_bound_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def heuristic(cls, method: str, started: float, lower_bound_ms: float | None, **extra: Any) -> SolverInfo:
        """A rule's record (the baselines): status "heuristic", timed from ``started`` (``time.perf_counter()``)."""
        return cls(method, "heuristic", time.perf_counter() - started, lower_bound_ms, dict(extra))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "status": self.status,
            "solve_time_s": self.solve_time_s,
            "lower_bound_ms": self.lower_bound_ms,
        }
        d.update(self.extra)
        return d


@dataclass
class Plan:
    world_size: int
    lengths: list[int]
    micro_batches: list[MicroBatch]
    estimated_time_ms: float | None = None
    solver: SolverInfo = field(default_factory=lambda: SolverInfo(method="manual"))
    tensor_parallel_size: int = 1  # C6: group ranks are units of this many GPUs (module docstring)

    @property
    def num_units(self) -> int:
        """How many planning ranks the groups partition: GPUs at TP 1, else units of ``tensor_parallel_size``."""
        return self.world_size // self.tensor_parallel_size

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "world_size": self.world_size,
            "lengths": [int(x) for x in self.lengths],
            "micro_batches": [mb.to_dict() for mb in self.micro_batches],
            "estimated_time_ms": self.estimated_time_ms,
            "solver": self.solver.to_dict(),
        }
        if self.tensor_parallel_size != 1:  # additive: plans without TP read and write as before
            d["tensor_parallel_size"] = self.tensor_parallel_size
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        """Write atomically (a crash never leaves half a plan)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping):
            raise PlanError(f"plan JSON: expected an object, got {type(d).__name__}")
        try:
            mbs = []
            for m, mb in enumerate(_as_list(d["micro_batches"], "micro_batches")):
                groups = []
                for gi, g in enumerate(_as_list(mb["groups"], f"micro_batches[{m}].groups")):
                    where = f"micro_batches[{m}].groups[{gi}]"
                    groups.append(
                        Group(
                            _int_list(g["ranks"], where + ".ranks"),
                            _int_list(g.get("sequences", []), where + ".sequences"),
                            _mode(g.get("recompute", "none"), where + ".recompute"),
                        )
                    )
                mbs.append(MicroBatch(groups))
            s = dict(d.get("solver") or {"method": "manual"})
            solver = SolverInfo(
                method=str(s.pop("method", "manual")),
                status=str(s.pop("status", "unknown")),
                solve_time_s=float(s.pop("solve_time_s", 0.0) or 0.0),
                lower_bound_ms=s.pop("lower_bound_ms", None),
                extra=s,
            )
            ws = _int_list([d["world_size"]], "world_size")[0]
            tp = _int_list([d.get("tensor_parallel_size", 1)], "tensor_parallel_size")[0]
            if tp < 1:
                raise PlanError(f"plan JSON: 'tensor_parallel_size' = {tp} must be a positive integer")
            return cls(ws, _int_list(d["lengths"], "lengths"), mbs, d.get("estimated_time_ms"), solver, tp)
        except KeyError as e:
            raise PlanError(f"plan JSON: missing field {e}") from None
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan JSON: malformed: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan JSON: not valid JSON: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())

    # ---------------------------------------------------------------- views
    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    def degree_histogram(self) -> dict[int, int]:
        """Number of groups of each degree over all micro-batches."""
        h: dict[int, int] = {}
        for mb in self.micro_batches:
            for g in mb.groups:
                h[g.degree] = h.get(g.degree, 0) + 1
        return dict(sorted(h.items()))


def _as_list(v: Any, where: str) -> list:
    if not isinstance(v, (list, tuple)):
        raise PlanError(f"plan JSON: '{where}' must be a list, got {type(v).__name__}")
    return list(v)


def _mode(v: Any, where: str) -> str:
    if v not in MODES:
        raise PlanError(f"plan JSON: '{where}' = {v!r} is not a recompute mode ({', '.join(MODES)})")
    return v


def _int_list(v: Any, where: str) -> list[int]:
    """Integers of a JSON list; a float, bool or string is a malformed plan, not silently rounded."""
    out = []
    for k, x in enumerate(_as_list(v, where)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise PlanError(f"plan JSON: '{where}[{k}]' = {x!r} is not an integer")
        out.append(int(x))
    return out


def micro_batch_ms(mb: MicroBatch, lengths: Sequence[int], cost: CostModel) -> float:
    """Slowest group of the micro-batch (groups holding no sequence cost nothing)."""
    times = [
        cost.group_time_ms([lengths[i] for i in g.sequences], g.degree, g.recompute) for g in mb.groups if g.sequences
    ]
    return max(times, default=0.0)


def estimate_plan_ms(plan: Plan, cost: CostModel) -> float:
    """Iteration time by the DESIGN.md formulas: sum over micro-batches of the slowest group."""
    return sum(micro_batch_ms(mb, plan.lengths, cost) for mb in plan.micro_batches)


def _check_header(plan: Plan, world_size: int | None, num_sequences: int | None) -> None:
    ws, tp = plan.world_size, plan.tensor_parallel_size
    if world_size is not None and ws != world_size:
        raise PlanError(f"plan is for world size {ws}, but the job has {world_size} ranks")
    if ws <= 0:
        raise PlanError(f"world_size must be positive, got {ws}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise PlanError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    if ws % tp:
        raise PlanError(f"tensor_parallel_size {tp} does not divide the world size {ws}")
    n = len(plan.lengths)
    if num_sequences is not None and n != num_sequences:
        raise PlanError(f"plan has {n} lengths, but the global batch has {num_sequences} sequences")
    for i, L in enumerate(plan.lengths):
        if L <= 0:
            raise PlanError(f"lengths[{i}] = {L}: a sequence must have at least one token")
    if not plan.micro_batches:
        raise PlanError("plan has no micro-batch")


def _check_group(m: int, gi: int, g: Group, ws: int, n: int, owner: dict[int, int], seen: dict) -> None:
    """Ranks in range and in no other group; sequences in range and in no other group (both recorded)."""
    if not g.ranks:
        raise PlanError(f"micro-batch {m} group {gi} has no rank")
    if g.recompute not in MODES:
        raise PlanError(f"micro-batch {m} group {gi}: recompute {g.recompute!r} is not one of {', '.join(MODES)}")
    for r in g.ranks:
        if not 0 <= r < ws:
            raise PlanError(f"micro-batch {m} group {gi}: rank {r} is outside 0..{ws - 1}")
        if r in owner:
            if owner[r] == gi:
                raise PlanError(f"micro-batch {m} group {gi}: rank {r} is listed twice")
            raise PlanError(f"micro-batch {m}: rank {r} is in group {owner[r]} and group {gi}")
        owner[r] = gi
    for s in g.sequences:
        if not 0 <= s < n:
            raise PlanError(f"micro-batch {m} group {gi}: sequence index {s} is outside 0..{n - 1}")
        if s in seen:
            raise PlanError(
                f"sequence {s} is assigned twice (micro-batch {seen[s][0]} group {seen[s][1]} "
                f"and micro-batch {m} group {gi})"
            )
        seen[s] = (m, gi)


def _check_micro_batch(m: int, mb: MicroBatch, ws: int, n: int, seen: dict[int, tuple[int, int]]) -> None:
    """The groups partition the ranks; a group is empty only when there are fewer sequences than groups."""
    if not mb.groups:
        raise PlanError(f"micro-batch {m} has no group")
    owner: dict[int, int] = {}
    for gi, g in enumerate(mb.groups):
        _check_group(m, gi, g, ws, n, owner, seen)
    missing = sorted(set(range(ws)) - set(owner))
    if missing:
        raise PlanError(f"micro-batch {m}: groups do not partition the ranks; ranks {missing[:8]} are in no group")
    empty = [gi for gi, g in enumerate(mb.groups) if not g.sequences]
    if empty and sum(len(g.sequences) for g in mb.groups) >= len(mb.groups):
        raise PlanError(
            f"micro-batch {m}: group {empty[0]} holds no sequence although the micro-batch has "
            f"at least as many sequences as groups"
        )


def _check_group_cost(where: str, g: Group, lengths: Sequence[int], cost: CostModel) -> None:
    """Degree divides the heads and has a bandwidth; topology (one node or whole nodes); memory (of the
    group's recompute mode, which the cost model must know)."""
    d, gpn, heads = g.degree, cost.gpus_per_node, cost.num_attention_heads
    mode = g.recompute
    if mode not in cost.modes:
        raise PlanError(
            f"{where}: recompute mode {mode!r} is not in the cost model (has {', '.join(cost.modes)}; "
            f"add its 'recompute.{mode}' coefficients)"
        )
    if heads % d:
        raise PlanError(f"{where}: degree {d} does not divide num_attention_heads {heads}")
    if d > 1 and d not in cost.alltoall.bandwidth_gbs:
        raise PlanError(f"{where}: cost model has no all-to-all bandwidth for degree {d}")
    nodes = sorted({r // gpn for r in g.ranks})
    if d <= gpn:
        if len(nodes) != 1:
            raise PlanError(
                f"{where}: a group of degree <= gpus_per_node ({gpn}) must lie in one node, spans nodes {nodes}"
            )
    elif d % gpn or len(nodes) != d // gpn:
        raise PlanError(
            f"{where}: a group larger than a node must span exactly {d}/{gpn} whole nodes, spans nodes {nodes}"
        )
    tokens = sum(lengths[s] for s in g.sequences)
    mem = cost.memory_mb(tokens, d, mode)
    if mem > cost.limit_mb + 1e-6:
        how = "" if mode == "none" else f" (recompute {mode})"
        raise PlanError(
            f"{where}: {tokens} tokens need {mem:.1f} MB per GPU{how}, over the limit {cost.limit_mb:.1f} MB"
        )


def _unit_cost(cost: CostModel, tp: int) -> CostModel:
    """The cost model of the plan's units: ``cost`` if it is one already, else made from the per-GPU one (without
    TP-sequence parallelism: the larger activation share, so a plan that passes here fits either way). A plan
    without the field is over the cost model's own ranks (the solvers' plans over units, before stamping)."""
    made_for = unit_size(cost)
    if made_for == tp or tp == 1:
        return cost
    if made_for != 1:
        raise PlanError(f"plan is over units of TP {tp}, but the cost model is over units of TP {made_for}")
    try:
        return unit_cost_model(cost, tp)
    except CostModelError as e:
        raise PlanError(f"plan at tensor_parallel_size {tp}: {e}") from None


def validate_plan(
    plan: Plan, cost: CostModel | None = None, *, world_size: int | None = None, num_sequences: int | None = None
) -> None:
    """Check every invariant of DESIGN.md; raise PlanError naming the first broken one.

    Without a cost model only the structural invariants are checked (partition of ranks,
    every sequence exactly once); with one, also degrees, topology and memory.
    """
    _check_header(plan, world_size, num_sequences)
    ws, n = plan.num_units, len(plan.lengths)  # groups partition the units (the GPUs at TP 1)
    seen: dict[int, tuple[int, int]] = {}
    for m, mb in enumerate(plan.micro_batches):
        _check_micro_batch(m, mb, ws, n, seen)
    unassigned = sorted(set(range(n)) - set(seen))
    if unassigned:
        raise PlanError(f"sequences {unassigned[:8]} (of {len(unassigned)}) are in no group")
    if cost is None:
        return
    cost = _unit_cost(cost, plan.tensor_parallel_size)
    for m, mb in enumerate(plan.micro_batches):
        for gi, g in enumerate(mb.groups):
            _check_group_cost(
                f"micro-batch {m} group {gi} (degree {g.degree}, ranks {g.ranks[:8]})", g, plan.lengths, cost
            )
