"""Which rank tuples may form an SP group, and how a multiset of degrees maps onto them.

The runtime creates every process group a plan may use once, at start-up (``new_group`` is
collective), so the set must be fixed per (cost model, world size): for each allowed degree d,
the aligned blocks ``[k*d, (k+1)*d)``. Allowed degrees either divide ``gpus_per_node`` (a block
then lies in one node) or are multiples of it (a block then covers d / gpus_per_node whole
nodes), so every candidate group satisfies the topology invariant of DESIGN.md by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from .costmodel import CostModel
from .plan import PlanError

__all__ = ["candidate_groups", "place_groups", "can_place"]


def candidate_groups(cost: CostModel, world_size: int) -> list[tuple[int, ...]]:
    """THE fixed set of rank tuples any plan may use: aligned blocks of every allowed degree."""
    cost.check_world_size(world_size)
    out: list[tuple[int, ...]] = []
    for d in cost.allowed_degrees(world_size):
        for k in range(world_size // d):
            out.append(tuple(range(k * d, (k + 1) * d)))
    return out


def _check_degrees(degrees: Sequence[int], cost: CostModel, world_size: int) -> list[int]:
    cost.check_world_size(world_size)
    allowed = set(cost.allowed_degrees(world_size))
    degs = [int(d) for d in degrees]
    bad = sorted({d for d in degs if d not in allowed})
    if bad:
        raise PlanError(f"degrees {bad} are not allowed on {world_size} ranks (allowed: {sorted(allowed)})")
    if sum(degs) != world_size:
        raise PlanError(
            f"group degrees {sorted(degs, reverse=True)[:16]} sum to {sum(degs)}, not the world size {world_size}"
        )
    return degs


def _first_fit(order: list[int], degs: list[int], world_size: int) -> list[int] | None:
    """Largest degrees first, each at the lowest free aligned block; None if one finds no block.

    With a divisibility chain of degrees (the common case: powers of two) this always succeeds.
    A pointer per degree keeps it linear: blocks before the last one taken stay taken.
    """
    free = (1 << world_size) - 1
    start: list[int] = [0] * len(degs)
    ptr: dict[int, int] = {}
    for i in order:
        d = degs[i]
        mask = (1 << d) - 1
        k = ptr.get(d, 0)
        nblocks = world_size // d
        while k < nblocks and (free >> (k * d)) & mask != mask:
            k += 1
        if k == nblocks:
            return None
        free &= ~(mask << (k * d))
        start[i] = k * d
        ptr[d] = k + 1
    return start


def _search(order: list[int], degs: list[int], world_size: int, max_steps: int = 200_000) -> list[int] | None:
    """Exhaustive (bounded) search over aligned blocks, for degree sets that are not a chain."""
    start = [0] * len(degs)
    steps = 0

    def rec(pos: int, free: int) -> bool:
        nonlocal steps
        if pos == len(order):
            return True
        i = order[pos]
        d = degs[i]
        mask = (1 << d) - 1
        # Groups of equal degree are interchangeable: keep their starts increasing.
        lo = start[order[pos - 1]] // d + 1 if pos and degs[order[pos - 1]] == d else 0
        for k in range(lo, world_size // d):
            steps += 1
            if steps > max_steps:
                return False
            blk = mask << (k * d)
            if free & blk == blk:
                start[i] = k * d
                if rec(pos + 1, free & ~blk):
                    return True
        return False

    return start if rec(0, (1 << world_size) - 1) else None


def place_groups(degrees: Sequence[int], cost: CostModel, world_size: int) -> list[list[int]]:
    """Concrete ranks for groups of the given degrees (summing to world_size), in input order.

    Every returned group is one of ``candidate_groups(cost, world_size)``; together they
    partition 0..world_size-1. Raises PlanError when the degrees cannot be placed.
    """
    degs = _check_degrees(degrees, cost, world_size)
    order = sorted(range(len(degs)), key=lambda i: -degs[i])
    start = _first_fit(order, degs, world_size)
    if start is None and len(degs) <= 256:
        start = _search(order, degs, world_size)
    if start is None:
        raise PlanError(
            f"group degrees {sorted(degs, reverse=True)[:16]} cannot be placed on aligned blocks of "
            f"{world_size} ranks ({cost.gpus_per_node} per node)"
        )
    return [list(range(s, s + d)) for s, d in zip(start, degs)]


def can_place(degrees: Sequence[int], cost: CostModel, world_size: int) -> bool:
    try:
        place_groups(degrees, cost, world_size)
    except PlanError:
        return False
    return True
