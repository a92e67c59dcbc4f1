"""Homogeneous baselines: one SP degree for every sequence of a global batch.

``static`` is what a tuned Megatron context-parallel or DeepSpeed-Ulysses run does: one
degree, fixed for the run, large enough for the longest sequence the run is configured for
(``max_seq_len``). ``batch-adaptive`` picks the best homogeneous degree for each global batch
(large enough only for that batch's longest sequence). Both are scored with the same cost model
and use only groups of ``placement.candidate_groups``, so they compare fairly with FlexSP.

Packing for a degree d (``ws / d`` groups per micro-batch, every rank busy in every micro-batch):

1. best-fit-decreasing of the sequences into bins of the group capacity (memory) gives the
   fewest micro-batches M = ceil(bins / groups) that the packing reaches;
2. the sequences are re-spread over the M x groups slots, longest first, each onto the least
   loaded slot that still has memory (LPT), so every group in a micro-batch has similar time;
3. slots are sorted by time and cut into micro-batches of ``ws / d`` slots: with the slot
   times fixed, this ordering minimises the sum over micro-batches of the slowest slot.
The better of the plain BFD bins and the LPT spread (by estimated time) is kept.

Without ``static_degree``, static tries every degree that holds ``max_seq_len`` and keeps the
best for the batch at hand; a real run fixes one degree for all batches, so this favours
static slightly (and makes FlexSP's measured speedup over it conservative).
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections.abc import Sequence

from .costmodel import CostModel
from .placement import candidate_groups
from .plan import Group, MicroBatch, NoFeasiblePlanError, Plan, PlanError, SolverInfo, estimate_plan_ms

__all__ = ["homogeneous_degrees", "homogeneous_plan", "static_plan", "batch_adaptive_plan", "fill_empty_groups"]


def homogeneous_degrees(cost: CostModel, world_size: int) -> dict[int, list[tuple[int, ...]]]:
    """Degree -> its candidate groups, for degrees whose candidate groups tile all ranks."""
    by_degree: dict[int, list[tuple[int, ...]]] = {}
    for g in candidate_groups(cost, world_size):
        by_degree.setdefault(len(g), []).append(tuple(g))
    out = {}
    for d, groups in sorted(by_degree.items()):
        ranks = sorted(r for g in groups for r in g)
        if ranks == list(range(world_size)):
            out[d] = sorted(groups)
    return out


def _bfd_bins(order: Sequence[int], lengths: Sequence[int], cap: int) -> list[list[int]]:
    """Best-fit decreasing (``order`` is longest first): each sequence into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        L = lengths[i]
        k = bisect.bisect_left(free, (L, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (rem - L, b))
        else:
            bins.append([i])
            bisect.insort(free, (cap - L, len(bins) - 1))
    return bins


def _lpt_slots(
    order: Sequence[int], lengths: Sequence[int], cap: int, slots: int, weight: Sequence[float]
) -> list[list[int]] | None:
    """Longest first onto the least loaded slot with memory left; None if some sequence fits nowhere."""
    heap = [(0.0, s) for s in range(slots)]
    tokens = [0] * slots
    out: list[list[int]] = [[] for _ in range(slots)]
    for i in order:
        L = lengths[i]
        skipped = []
        while heap and tokens[heap[0][1]] + L > cap:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        load, s = heapq.heappop(heap)
        out[s].append(i)
        tokens[s] += L
        heapq.heappush(heap, (load + weight[i], s))
        for item in skipped:
            heapq.heappush(heap, item)
    return out


def fill_empty_groups(mb: MicroBatch, lengths: Sequence[int], cost: CostModel) -> None:
    """Give empty groups a sequence moved from a group holding several, while the invariant needs it.

    DESIGN.md allows an empty group only when a micro-batch has fewer sequences than groups.
    Each empty group (largest first) takes the longest sequence that fits it from the slowest
    group holding two or more. Moving never breaks memory of the old group and is checked for
    the new one; raises PlanError when no sequence fits an empty group.
    """
    if sum(len(g.sequences) for g in mb.groups) < len(mb.groups):
        return
    empty = sorted((g for g in mb.groups if not g.sequences), key=lambda g: -g.degree)
    if not empty:
        return

    def time_of(k: int) -> float:
        g = mb.groups[k]
        return cost.group_time_ms([lengths[s] for s in g.sequences], g.degree)

    donors = [(-time_of(k), k) for k, g in enumerate(mb.groups) if len(g.sequences) >= 2]
    heapq.heapify(donors)
    for target in empty:
        skipped = []
        moved = False
        while donors and not moved:
            item = heapq.heappop(donors)
            g = mb.groups[item[1]]
            fit = [s for s in g.sequences if cost.fits(lengths[s], target.degree)]
            if not fit:
                skipped.append(item)
                continue
            s = max(fit, key=lambda x: lengths[x])
            g.sequences.remove(s)
            target.sequences.append(s)
            moved = True
            if len(g.sequences) >= 2:
                heapq.heappush(donors, (-time_of(item[1]), item[1]))
        for item in skipped:
            heapq.heappush(donors, item)
        if not moved:
            raise PlanError(f"cannot fill an empty group of degree {target.degree}: no movable sequence fits it")


def _slots_to_plan(
    slots: list[list[int]], lengths: Sequence[int], cost: CostModel, world_size: int, groups: list[tuple[int, ...]]
) -> Plan:
    d = len(groups[0])
    per_mb = len(groups)
    times = [cost.group_time_ms([lengths[i] for i in s], d) if s else 0.0 for s in slots]
    order = sorted(range(len(slots)), key=lambda k: -times[k])
    mbs = []
    for m in range(math.ceil(len(slots) / per_mb)):
        chunk = order[m * per_mb : (m + 1) * per_mb]
        chunk_slots = [sorted(slots[k]) for k in chunk] + [[] for _ in range(per_mb - len(chunk))]
        if not any(chunk_slots):
            continue
        mb = MicroBatch([Group(list(g), s) for g, s in zip(groups, chunk_slots)])
        fill_empty_groups(mb, lengths, cost)
        mbs.append(mb)
    return Plan(world_size=world_size, lengths=[int(x) for x in lengths], micro_batches=mbs)


def homogeneous_plan(lengths: Sequence[int], cost: CostModel, world_size: int, degree: int) -> Plan:
    """The best plan this module finds with every group of one degree (solver info not filled)."""
    degrees = homogeneous_degrees(cost, world_size)
    if degree not in degrees:
        raise PlanError(
            f"degree {degree} cannot tile {world_size} ranks with candidate groups "
            f"(possible degrees: {sorted(degrees)})"
        )
    lengths = [int(x) for x in lengths]
    if not lengths:
        raise PlanError("cannot plan an empty global batch")
    cap = cost.capacity(degree)
    too_long = [L for L in lengths if L > cap]
    if too_long:
        raise NoFeasiblePlanError(
            sorted(too_long, reverse=True), cap, degree, world_size, f"homogeneous degree {degree} is too small"
        )
    groups = degrees[degree]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins = _bfd_bins(order, lengths, cap)
    m_min = math.ceil(len(bins) / len(groups))
    c = cost.compute
    bw = 0.0 if degree == 1 else cost.alltoall.bytes_per_token / 2**20 / cost.bandwidth(degree)
    weight = [(c.alpha1_ms_per_token2 * L * L + c.alpha2_ms_per_token * L + bw * L) / degree for L in lengths]
    order_w = sorted(range(len(lengths)), key=lambda i: (-weight[i], -lengths[i]))
    best = _slots_to_plan(bins, lengths, cost, world_size, groups)
    best_ms = estimate_plan_ms(best, cost)
    for m in (m_min, m_min + 1):
        slots = _lpt_slots(order_w, lengths, cap, m * len(groups), weight)
        if slots is None:
            continue
        cand = _slots_to_plan(slots, lengths, cost, world_size, groups)
        ms = estimate_plan_ms(cand, cost)
        if ms < best_ms:
            best, best_ms = cand, ms
    best.estimated_time_ms = best_ms
    return best


def _best_homogeneous(
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    hold_len: int,
    method: str,
    forced: int | None,
    lower_bound_ms: float | None,
) -> Plan:
    t0 = time.perf_counter()
    degrees = homogeneous_degrees(cost, world_size)
    if forced is not None:
        if forced not in degrees:
            raise PlanError(
                f"{method}: degree {forced} is not usable on {world_size} ranks with cost model "
                f"'{cost.name}' (usable homogeneous degrees: {sorted(degrees)})"
            )
        cands = [forced]
    else:
        cands = [d for d in degrees if cost.fits(hold_len, d)]
        if not cands:
            big = max(degrees)
            raise NoFeasiblePlanError(
                [hold_len],
                cost.capacity(big),
                big,
                world_size,
                f"{method}: no homogeneous degree holds length {hold_len}",
            )
    best: Plan | None = None
    for d in cands:
        p = homogeneous_plan(lengths, cost, world_size, d)
        if best is None or p.estimated_time_ms < best.estimated_time_ms:
            best = p
    assert best is not None
    degree = best.micro_batches[0].groups[0].degree
    best.solver = SolverInfo.heuristic(method, t0, lower_bound_ms, degree=degree)
    return best


def static_plan(
    lengths: Sequence[int],
    cost: CostModel,
    world_size: int,
    *,
    max_seq_len: int | None = None,
    degree: int | None = None,
    lower_bound_ms: float | None = None,
) -> Plan:
    """One degree for every sequence: ``degree`` if given, else the best degree holding ``max_seq_len``."""
    lengths = [int(x) for x in lengths]
    hold = max(lengths) if max_seq_len is None else int(max_seq_len)
    if lengths and max(lengths) > hold:
        raise PlanError(
            f"static: a sequence of {max(lengths)} tokens is longer than max_seq_len {hold} "
            f"(truncate or drop overlong sequences first)"
        )
    return _best_homogeneous(lengths, cost, world_size, hold, "static", degree, lower_bound_ms)


def batch_adaptive_plan(
    lengths: Sequence[int], cost: CostModel, world_size: int, *, lower_bound_ms: float | None = None
) -> Plan:
    """The best homogeneous degree for this global batch."""
    lengths = [int(x) for x in lengths]
    if not lengths:
        raise PlanError("cannot plan an empty global batch")
    return _best_homogeneous(lengths, cost, world_size, max(lengths), "batch-adaptive", None, lower_bound_ms)
