"""Baseline ``megatron-hybrid-cp``: the rule of megatron.core's hybrid context-parallel scheduler.

megatron-core 0.16.1 ships ``BalancedCPScheduler`` (megatron/core/pipeline_parallel/
hybrid_cp_schedule.py). Its rule, reimplemented here without torch (the planner never imports
torch; the class itself needs only a group with ``size()`` and runs on CPU, and
tests/planner/test_baselines.py drives it and checks that :func:`balanced_cp_rounds` gives the
same assignment):

* sort sub-samples by length, longest first; each needs a CP size ``gpus_needed(L)`` = the next
  power of two of L / max_seqlen_per_cp_rank; its workload is ``L^2 / gpus_needed(L)``;
* per round ("group" in Megatron, a micro-batch here): cut the pending samples into as many
  buckets of balanced workload as there are distinct CP sizes; repeatedly take the first
  bucket head that can be placed, on a new CP group of free ranks if enough are free, else on
  the least loaded existing group of the same size; after the CP size first drops, stop as soon
  as all ranks are within ``delta`` (5%) of the busiest; pop the last sample of the busiest
  group while that reduces the imbalance; finally double the smallest group (first created
  first) until no rank is idle. Leftover samples go to the next round in their order.

Where this baseline differs from the class, and why:

* ``max_seqlen_per_cp_rank`` is the cost model's tokens per GPU, so a sample alone always fits.
* Megatron runs a group's samples one after another inside a round; a FlexSP plan packs a
  group's sequences of one micro-batch together, so a group only accepts a sample while its
  tokens fit the group's memory (a round ends earlier when nothing else fits).
* CP sizes are the cost model's allowed degrees: a size is the smallest allowed degree >= the
  power of two (identical for the power-of-two degrees of the shipped presets), and growing an
  idle-rank-absorbing group goes to the next allowed degree that fits in the idle ranks instead
  of ``min(2 * size, world)``; if no group can grow, the idle ranks form groups that get a
  sequence moved to them (or stay empty when the round has fewer sequences than groups).
* Groups are then placed on aligned candidate groups (placement.place_groups) rather than
  the next consecutive ranks, as every plan of this project must be.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .baselines import fill_empty_groups
from .costmodel import CostModel
from .placement import candidate_groups, place_groups
from .plan import Group, MicroBatch, NoFeasiblePlanError, Plan, PlanError, SolverInfo, estimate_plan_ms

BALANCE_DELTA = 0.05  # a round stops once every rank is within this fraction of the busiest (Megatron)

__all__ = ["CPGroup", "megatron_gpus_needed", "balanced_cp_rounds", "rounds_to_rank_lists", "hybrid_cp_plan"]


@dataclass
class CPGroup:
    """One CP group of a round: its size and the (sample id, length) pairs it runs, in order."""

    size: int
    items: list[tuple[int, int]] = field(default_factory=list)
    load: float = 0.0
    tokens: int = 0


def megatron_gpus_needed(length: int, max_seqlen_per_rank: int) -> int:
    """Megatron's CP size of a sample: the next power of two of length / max_seqlen_per_rank (>= 1)."""
    return max(1, 2 ** math.ceil(math.log2(length / max_seqlen_per_rank)))


def _buckets(
    pending: list[tuple[int, int]], need: Callable[[int], int], work: Callable[[int], float]
) -> list[list[tuple[int, int]]]:
    """Consecutive buckets of about equal workload, one per distinct CP size (Megatron's make_buckets_equal)."""
    k = len({need(L) for _, L in pending})
    target = sum(work(L) for _, L in pending) / k
    buckets: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    cur_work, remaining_k = 0.0, k
    for i, item in enumerate(pending):
        w = work(item[1])
        # close the bucket when it would be too heavy, or to keep a sample for each remaining bucket
        if cur and (cur_work + w > target * 1.1 or len(pending) - i <= remaining_k - len(buckets)):
            buckets.append(cur)
            cur, cur_work = [], 0.0
            remaining_k -= 1
        cur.append(item)
        cur_work += w
    if cur:
        buckets.append(cur)
    return buckets


class _Round:
    """One round of the rule: CP groups filled from the buckets' heads, trimmed, then grown over idle ranks."""

    def __init__(
        self,
        total: int,
        need: Callable[[int], int],
        work: Callable[[int], float],
        grow: Callable[[int, int], int | None],
        fits: Callable[[int, int], bool] | None,
        delta: float,
    ):
        self.total, self.need, self.work, self.grow, self.fits, self.delta = total, need, work, grow, fits, delta
        self.groups: list[CPGroup] = []
        self.used = 0
        # Loads only grow while placing, so heaps with lazily skipped stale entries give the least
        # loaded group (ties: earliest created, as Megatron's min over group ids) in O(log n).
        self.by_size: dict[int, list[tuple[float, int]]] = {}
        self.all_heap: list[tuple[float, int]] = []
        self.hi = 0.0

    def least_loaded_fitting(self, nd: int, L: int) -> int | None:
        heap = self.by_size.get(nd, [])
        skipped, found = [], None
        while heap:
            load, k = heap[0]
            g = self.groups[k]
            if load != g.load:  # stale
                heapq.heappop(heap)
                continue
            if self.fits is None or self.fits(g.tokens + L, g.size):
                found = k
                break
            skipped.append(heapq.heappop(heap))
        for item in skipped:
            heapq.heappush(heap, item)
        return found

    def lowest_load(self) -> float:
        if self.used < self.total:
            return 0.0
        heap = self.all_heap
        while heap[0][0] != self.groups[heap[0][1]].load:
            heapq.heappop(heap)
        return heap[0][0]

    def _pick(self, buckets: list[list[tuple[int, int]]]) -> tuple[list[tuple[int, int]], int, int | None] | None:
        """The first bucket head that can be placed: (bucket, CP size, group or None for a new group)."""
        for b in buckets:
            if not b:
                continue
            L = b[-1][1]
            nd = self.need(L)
            if self.total - self.used >= nd:  # free ranks have no load, so a new group beats any existing one
                return b, nd, None
            k = self.least_loaded_fitting(nd, L)
            if k is not None:
                return b, nd, k
        return None

    def _put(self, nd: int, k: int | None, sid: int, L: int) -> None:
        if k is None:
            self.groups.append(CPGroup(nd))
            self.used += nd
            k = len(self.groups) - 1
        g = self.groups[k]
        g.items.append((sid, L))
        g.load += self.work(L)
        g.tokens += L
        heapq.heappush(self.by_size.setdefault(nd, []), (g.load, k))
        heapq.heappush(self.all_heap, (g.load, k))
        self.hi = max(self.hi, g.load)

    def place(self, buckets: list[list[tuple[int, int]]]) -> None:
        """Take bucket heads until nothing fits, or (once the CP size has dropped) the ranks are balanced."""
        first_need: int | None = None
        check_balance = False
        while buckets:
            pick = self._pick(buckets)
            if pick is None:
                break
            b, nd, k = pick
            sid, L = b.pop()
            if first_need is None:
                first_need = nd
            self._put(nd, k, sid, L)
            while buckets and not buckets[0]:
                buckets.pop(0)
            if nd < first_need:  # Megatron starts checking balance once the CP size first drops
                check_balance = True
            if check_balance and buckets and self.hi - self.lowest_load() <= self.delta * self.hi:
                break

    def _spread(self) -> tuple[float, float]:
        hi = max((g.load for g in self.groups), default=0.0)
        lo = 0.0 if self.used < self.total else min(g.load for g in self.groups)
        return hi, lo

    def trim(self, leftovers: list[tuple[int, int]]) -> None:
        """Pop the busiest group's last sample (to ``leftovers``) while that narrows the spread."""
        while True:
            hi, lo = self._spread()
            if hi - lo <= self.delta * hi or lo == 0:
                break
            g = next(x for x in self.groups if x.load == hi)
            if len(g.items) <= 1:
                break
            sid, L = g.items[-1]
            w = self.work(L)
            proj = [x.load - w if x is g else x.load for x in self.groups]
            if max(proj) - min(proj) < hi - lo:
                g.items.pop()
                g.load -= w
                g.tokens -= L
                leftovers.append((sid, L))
            else:
                break

    def run(self, pending: list[tuple[int, int]]) -> tuple[list[CPGroup], list[tuple[int, int]]]:
        """The round's groups and the samples left for the next round, in their order."""
        buckets = [list(reversed(b)) for b in _buckets(pending, self.need, self.work)]  # pop() takes the head
        self.place(buckets)
        leftovers = [item for b in buckets for item in reversed(b)]
        self.trim(leftovers)
        self.grow_over_idle()
        return self.groups, leftovers

    def grow_over_idle(self) -> None:
        """No idle rank: grow the smallest group (earliest first) until every rank is used."""
        while self.used < self.total:
            for g in sorted(self.groups, key=lambda x: x.size):  # stable: creation order among equal sizes
                new = self.grow(g.size, self.total - self.used)
                if new is not None:
                    self.used += new - g.size
                    g.size = new
                    break
            else:
                break


def balanced_cp_rounds(
    lengths: Sequence[int],
    total_gpus: int,
    *,
    need: Callable[[int], int],
    grow: Callable[[int, int], int | None] | None = None,
    fits: Callable[[int, int], bool] | None = None,
    delta: float = BALANCE_DELTA,
) -> list[list[CPGroup]]:
    """Megatron's BalancedCPScheduler rule over a whole global batch: rounds of CP groups.

    ``need(L)`` is the CP size of a sample, ``grow(size, idle)`` the size a group grows to when
    ranks are idle (None: cannot grow; Megatron: min(2 * size, total_gpus)), ``fits(tokens,
    size)`` whether a group may take more tokens (None: always, as in Megatron).
    """
    if grow is None:
        grow = lambda size, idle: min(2 * size, total_gpus)  # noqa: E731
    work = lambda L: (L * L) / need(L)  # noqa: E731  (Megatron's get_total_workload)
    pending = sorted(((i, int(L)) for i, L in enumerate(lengths)), key=lambda x: x[1], reverse=True)
    for _, L in pending:
        if need(L) > total_gpus:
            raise ValueError(f"a sample of length {L} needs CP size {need(L)} > {total_gpus} ranks")
    rounds = []
    while pending:
        groups, pending = _Round(total_gpus, need, work, grow, fits, delta).run(pending)
        if not any(g.items for g in groups):
            raise RuntimeError("hybrid-CP rule placed no sample in a round")  # cannot happen: a new group always fits
        rounds.append(groups)
    return rounds


def rounds_to_rank_lists(rounds: list[list[CPGroup]], total_gpus: int) -> list[list[list[int]]]:
    """Megatron's output form: per round, per rank, the sample ids it runs (groups on consecutive ranks)."""
    out = []
    for groups in rounds:
        per_rank: list[list[int]] = [[] for _ in range(total_gpus)]
        r = 0
        for g in groups:
            for q in range(r, r + g.size):
                per_rank[q] = [sid for sid, _ in g.items]
            r += g.size
        out.append(per_rank)
    return out


def hybrid_cp_plan(
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    *,
    lower_bound_ms: float | None = None,
    delta: float = BALANCE_DELTA,
) -> Plan:
    """A plan by Megatron's hybrid-CP rule (adapted as the module docstring says)."""
    t0 = time.perf_counter()
    lengths = [int(x) for x in lengths]
    if not lengths:
        raise PlanError("cannot plan an empty global batch")
    degrees = sorted({len(g) for g in candidate_groups(cost, world_size)})
    sizes_of = _cp_sizes(lengths, cost, world_size, degrees)

    def need(L: int) -> int:
        return sizes_of[L]

    def grow(size: int, idle: int) -> int | None:
        return next((d for d in degrees if size < d <= size + idle), None)

    caps = {d: cost.capacity(d) for d in degrees}  # same as cost.fits, without the call overhead

    mbs: list[MicroBatch] = []
    todo = list(range(len(lengths)))
    n_rounds = 0
    while todo:  # one pass, plus a pass for sequences a round could not keep (see _to_micro_batch)
        rounds = balanced_cp_rounds(
            [lengths[i] for i in todo],
            world_size,
            need=need,
            grow=grow,
            fits=lambda tokens, d: tokens <= caps[d],
            delta=delta,
        )
        n_rounds += len(rounds)
        deferred: list[int] = []
        for groups in rounds:
            for g in groups:  # ids of this pass -> indices into lengths
                g.items = [(todo[sid], L) for sid, L in g.items]
            mbs.append(_to_micro_batch(groups, lengths, cost, world_size, degrees, deferred))
        todo = sorted(deferred)
    plan = Plan(world_size=world_size, lengths=lengths, micro_batches=mbs)
    plan.estimated_time_ms = estimate_plan_ms(plan, cost)
    plan.solver = SolverInfo.heuristic("megatron-hybrid-cp", t0, lower_bound_ms, rounds=n_rounds)
    return plan


def _to_micro_batch(
    groups: list[CPGroup],
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    degrees: Sequence[int],
    deferred: list[int],
) -> MicroBatch:
    """Place a round's groups on candidate groups; idle ranks (groups that could not grow) form
    extra groups, which get a sequence moved to them. If none fits them, the round's most recent
    sequences are deferred to a later micro-batch until the round has fewer sequences than groups."""
    sizes = [g.size for g in groups]
    seqs = [[sid for sid, _ in g.items] for g in groups]
    idle = world_size - sum(sizes)
    while idle > 0:
        d = max(x for x in degrees if x <= idle)
        sizes.append(d)
        seqs.append([])
        idle -= d
    ranks = place_groups(sizes, cost, world_size)
    mb = MicroBatch([Group(list(r), sorted(s)) for r, s in zip(ranks, seqs)])
    try:
        fill_empty_groups(mb, lengths, cost)
    except PlanError:
        while sum(len(s) for s in seqs) >= len(seqs):
            k = max(range(len(seqs)), key=lambda j: len(seqs[j]))
            deferred.append(seqs[k].pop())
        mb = MicroBatch([Group(list(r), sorted(s)) for r, s in zip(ranks, seqs)])
    return mb


def _cp_sizes(lengths: list[int], cost: CostModel, world_size: int, degrees: list[int]) -> dict[int, int]:
    """The CP size of every distinct length; NoFeasiblePlanError naming those no allowed size holds."""
    per_rank = cost.tokens_per_gpu
    sizes_of = {L: _cp_size(L, degrees, per_rank, cost) for L in set(lengths)}
    bad = sorted((L for L, d in sizes_of.items() if d is None), reverse=True)
    if bad:
        raise NoFeasiblePlanError(
            bad,
            cost.capacity(degrees[-1]),
            degrees[-1],
            world_size,
            "megatron-hybrid-cp: no allowed CP size holds them",
        )
    return sizes_of  # type: ignore[return-value]


def _cp_size(L: int, degrees: Sequence[int], per_rank: int, cost: CostModel) -> int | None:
    """Smallest allowed degree >= Megatron's power-of-two CP size that holds L (None: none does)."""
    p2 = megatron_gpus_needed(L, per_rank)
    return next((d for d in degrees if d >= p2 and cost.fits(L, d)), None)
