"""Baseline ``megatron-dynamic-cp``: the rule of Megatron-LM's dynamic context parallelism.

Megatron-LM's ``--dynamic-context-parallel`` (scheduler ``default_dynamic_cp``) plans every
micro-batch over all DP x CP ranks with power-of-two CP sizes. This module is our own
torch-free statement of the rule as published in Megatron-LM's dev branch at revision
d48bd6be0a85cc0d6d3cc71e8750cf357cc6bdb1 (2026-08-21): ``DefaultDynamicCPScheduler`` in
``megatron/core/datasets/data_schedule.py`` and ``next_hdp_group_packing_aware`` /
``dcp_gpus_needed`` in ``megatron/core/datasets/data_schedule_utils.py``. One call of the rule
forms one micro-batch ("round"):

* sequences sorted longest first; a sequence's minimal CP size is the smallest power of two
  >= its tokens / tokens-per-rank capacity; its workload on a group of size c is s^2 / c (no
  communication or memory model beyond the token capacity);
* the workload cap is the round's tallest length x tokens-per-rank x 1.05, i.e. about the
  tallest sequence's per-rank workload at its minimal size (the source's constant; the issue's
  wording "x micro-batch target" describes the same bound);
* the tallest sequence opens the first group at its minimal size; every other sequence tries CP
  sizes from its minimum upward by doubling, and for each size either joins an existing group
  of that size whose packed tokens stay within the capacity, or opens a new group on free ranks;
  it takes the option with the lowest projected busiest-rank workload if that is within the cap,
  else it is left over for the next round;
* idle ranks are filled by doubling the first smallest group (later groups shift right), again
  and again; if no group can double, the round is replaced by one full-width group holding the
  longest sequences that fit, the rest left over.

Every rank takes part in every round, so every rank runs the same number of micro-batches.

Where this baseline differs from the source, and why:

* tokens-per-rank is the cost model's ``tokens_per_gpu``, and a group's packed tokens must fit
  ``cost.capacity(size)`` (the same bound: capacity = size x tokens_per_gpu);
* CP sizes are the powers of two among the cost model's allowed degrees (a size the model does
  not allow is skipped, as a doubling past it would be);
* groups are then placed on aligned candidate groups (placement.place_groups) rather than the
  next consecutive ranks, as every plan of this project must be (for power-of-two sizes in the
  rule's order these are the same consecutive blocks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .costmodel import CostModel
from .placement import place_groups
from .plan import Group, MicroBatch, NoFeasiblePlanError, Plan, PlanError, SolverInfo, estimate_plan_ms

__all__ = ["DcpGroup", "DcpRules", "dynamic_cp_round", "dynamic_cp_rounds", "dynamic_cp_plan", "WORKLOAD_CAP_DELTA"]

WORKLOAD_CAP_DELTA = 0.05  # the source's _DYNAMIC_CP_WORKLOAD_CAP_DELTA

Item = tuple[int, int]  # (sequence id, tokens)


@dataclass
class DcpGroup:
    """One CP group of a round, in rank order: its size, the sequences it packs, their tokens, and the
    per-rank workload (sum of s^2 / size, summed per sequence as the source does). Kept up to date
    incrementally: recomputing them for every candidate made 1024 ranks x 8192 sequences take 50 s."""

    size: int
    items: list[Item] = field(default_factory=list)
    tokens: int = 0
    load: float = 0.0

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.tokens += item[1]
        self.load += item[1] * item[1] / self.size

    def resize(self, size: int) -> None:
        self.size = size
        self.load = 0.0
        for _, L in self.items:
            self.load += L * L / size


@dataclass(frozen=True)
class DcpRules:
    """What the rule needs to know of the cluster: ranks, tokens per rank, and the CP sizes allowed."""

    total: int
    per_rank: int
    sizes: tuple[int, ...]  # allowed power-of-two CP sizes, ascending

    def min_size(self, length: int) -> int | None:
        """The smallest allowed size >= the power of two of length / per_rank that holds the sequence."""
        p2 = max(1, 2 ** math.ceil(math.log2(length / self.per_rank)))
        return next((c for c in self.sizes if c >= p2 and length <= c * self.per_rank), None)


def _best_option(
    groups: list[DcpGroup],
    by_size: dict[int, list[int]],
    free: int,
    busiest: float,
    item: Item,
    rules: DcpRules,
    cap: float,
) -> tuple[int, int] | None:
    """(size, index of the group to join, or -1 for a new group) with the lowest projected busiest rank;
    the first such option in the rule's order (sizes upward; existing groups, then a new one) wins ties."""
    length = item[1]
    first = rules.min_size(length)
    if first is None:
        return None
    best: tuple[float, int, int] | None = None
    for size in (c for c in rules.sizes if c >= first):
        work = length * length / size
        room = size * rules.per_rank - length
        for k in by_size.get(size, ()):
            g = groups[k]
            if g.tokens <= room:
                projected = max(busiest, g.load + work)
                if projected <= cap and (best is None or projected < best[0]):
                    best = (projected, size, k)
                    if projected <= busiest:  # no option can be lower, and later ones only tie: the rule's pick
                        return size, k
        if free >= size:
            projected = max(busiest, work)
            if projected <= cap and (best is None or projected < best[0]):
                best = (projected, size, -1)
                if projected <= busiest:
                    return size, -1
    return None if best is None else (best[1], best[2])


def _double_first_smallest(groups: list[DcpGroup], rules: DcpRules) -> bool:
    """Grow the first group of the smallest size to twice its size (capped at all ranks); False if none can."""
    smallest = min(g.size for g in groups)
    target = min(2 * smallest, rules.total)
    if target not in rules.sizes:
        return False
    start = 0
    for g in groups:
        if g.size == smallest and start + g.size - 1 + (target - smallest) < rules.total:
            g.resize(target)
            return True
        start += g.size
    return False


def _full_width_round(pending: list[Item], rules: DcpRules) -> tuple[list[DcpGroup], list[Item]]:
    """The fallback: one group of all ranks, packed longest first while the tokens fit."""
    if rules.total not in rules.sizes:
        raise PlanError(f"megatron-dynamic-cp: idle ranks cannot be filled (a group of all {rules.total} ranks)")
    group, rest = DcpGroup(rules.total), []
    for item in pending:
        if group.tokens + item[1] <= rules.total * rules.per_rank:
            group.add(item)
        else:
            rest.append(item)
    if not group.items:
        raise PlanError(f"megatron-dynamic-cp: sequence of {pending[0][1]} tokens fits no group")
    return [group], rest


def dynamic_cp_round(pending: Sequence[Item], rules: DcpRules) -> tuple[list[DcpGroup], list[Item]]:
    """One micro-batch by the rule: its groups in rank order, and the sequences left for later rounds.

    ``pending`` must be sorted longest first (the rule's order).
    """
    pending = list(pending)
    first = rules.min_size(pending[0][1])
    if first is None:
        raise PlanError(f"megatron-dynamic-cp: sequence of {pending[0][1]} tokens fits no power-of-two CP size")
    cap = pending[0][1] * rules.per_rank * (1.0 + WORKLOAD_CAP_DELTA)
    groups, leftovers = [DcpGroup(first)], []
    groups[0].add(pending[0])
    busiest = groups[0].load
    by_size = {first: [0]}  # indices of the groups of each size, in creation order
    free = rules.total - first  # ranks in no group yet
    for item in pending[1:]:
        choice = _best_option(groups, by_size, free, busiest, item, rules, cap)
        if choice is None:
            leftovers.append(item)
            continue
        if choice[1] < 0:
            by_size.setdefault(choice[0], []).append(len(groups))
            groups.append(DcpGroup(choice[0]))
            free -= choice[0]
        group = groups[choice[1]]
        group.add(item)
        busiest = max(busiest, group.load)
    while sum(g.size for g in groups) < rules.total:
        if not _double_first_smallest(groups, rules):
            return _full_width_round(pending, rules)
    return groups, leftovers


def dynamic_cp_rounds(lengths: Sequence[int], rules: DcpRules) -> list[list[DcpGroup]]:
    """All micro-batches of one global batch: rounds until no sequence is left."""
    pending = sorted(enumerate(int(x) for x in lengths), key=lambda it: (-it[1], it[0]))
    rounds = []
    while pending:
        groups, pending = dynamic_cp_round(pending, rules)
        rounds.append(groups)
    return rounds


def _rules(cost: CostModel, world_size: int) -> DcpRules:
    sizes = tuple(d for d in sorted(cost.allowed_degrees(world_size)) if d & (d - 1) == 0)
    return DcpRules(world_size, cost.tokens_per_gpu, sizes)


def dynamic_cp_plan(
    lengths: Sequence[int], cost: CostModel, world_size: int, *, lower_bound_ms: float | None = None
) -> Plan:
    """A plan by Megatron's dynamic-CP rule (adapted as the module docstring says)."""
    t0 = time.perf_counter()
    lengths = [int(x) for x in lengths]
    if not lengths:
        raise PlanError("cannot plan an empty global batch")
    rules = _rules(cost, world_size)
    bad = sorted({L for L in lengths if rules.min_size(L) is None}, reverse=True)
    if bad:
        top = rules.sizes[-1] if rules.sizes else 1
        raise NoFeasiblePlanError(
            bad, cost.capacity(top), top, world_size, "megatron-dynamic-cp: no power-of-two CP size holds them"
        )
    rounds = dynamic_cp_rounds(lengths, rules)
    mbs = []
    for groups in rounds:
        ranks = place_groups([g.size for g in groups], cost, world_size)
        mbs.append(MicroBatch([Group(list(r), sorted(i for i, _ in g.items)) for r, g in zip(ranks, groups)]))
    plan = Plan(world_size=world_size, lengths=lengths, micro_batches=mbs)
    plan.estimated_time_ms = estimate_plan_ms(plan, cost)
    plan.solver = SolverInfo.heuristic("megatron-dynamic-cp", t0, lower_bound_ms, rounds=len(rounds))
    return plan
