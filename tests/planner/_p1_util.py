"""Shared tiny cost models and brute-force references for the planner-core tests (P1)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from megatron.flexsp.planner.costmodel import CostModel, build_cost_model


def _two_layer_cost(name, heads, groups, gpus_per_node, alpha1, alpha2, beta1, bandwidth_gbs) -> CostModel:
    """2 layers, hidden 64, 1000 tokens per GPU: (1 GB - 24 MB model states) / 1 MB per token."""
    return build_cost_model(
        name=name,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=heads,
        num_query_groups=groups,
        gpus_per_node=gpus_per_node,
        alpha1_ms_per_token2=alpha1,
        alpha2_ms_per_token=alpha2,
        beta1_ms=beta1,
        bandwidth_gbs=bandwidth_gbs,
        limit_gb=1.0,
        model_states_mb=24.0,
        activation_mb_per_token=1.0,
    )


def tiny_cost(gpus_per_node: int = 4, heads: int = 8, beta1: float = 2.0, bandwidth_gbs=None, name="tiny") -> CostModel:
    """8-head model, 1000 tokens per GPU, all-to-all slower across nodes (degree 8)."""
    bw = {2: 1.0, 4: 0.5, 8: 0.1, 16: 0.05} if bandwidth_gbs is None else bandwidth_gbs
    return _two_layer_cost(name, heads, heads, gpus_per_node, 1e-4, 0.01, beta1, bw)


def small_cost(gpn: int = 4, heads: int = 8, bw: dict[int, float] | None = None) -> CostModel:
    """GQA (2 query groups), 1000 tokens per GPU, cheaper compute and slower links than tiny_cost."""
    return _two_layer_cost("small", heads, 2, gpn, 2e-5, 0.05, 5.0, bw or {2: 0.5, 4: 0.4, 8: 0.05})


def degree_multisets(allowed: Sequence[int], total: int) -> list[list[int]]:
    """All multisets of allowed degrees summing to total (largest first)."""
    out: list[list[int]] = []

    def rec(rest: int, maxd: int, cur: list[int]) -> None:
        if rest == 0:
            out.append(list(cur))
            return
        for d in sorted(allowed, reverse=True):
            if d <= min(rest, maxd):
                cur.append(d)
                rec(rest - d, d, cur)
                cur.pop()

    rec(total, max(allowed), [])
    return out


def brute_micro_batch(lengths: Sequence[int], cost: CostModel, world_size: int) -> float:
    """Optimal time of ONE micro-batch holding all ``lengths`` (every valid grouping tried)."""
    from megatron.flexsp.planner.placement import can_place

    n = len(lengths)
    best = float("inf")
    for degs in degree_multisets(cost.allowed_degrees(world_size), world_size):
        if not can_place(degs, cost, world_size):
            continue
        G = len(degs)
        for assign in itertools.product(range(G), repeat=n):
            members = [[] for _ in range(G)]
            for s, g in enumerate(assign):
                members[g].append(lengths[s])
            if n >= G and any(not m for m in members):
                continue
            if any(m and not cost.fits(sum(m), d) for m, d in zip(members, degs)):
                continue
            t = max(cost.group_time_ms(m, d) for m, d in zip(members, degs) if m)
            best = min(best, t)
    return best


def set_partitions(items: list[int]):
    """All partitions of a list into non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in set_partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1 :]


def brute_plan(lengths: Sequence[int], cost: CostModel, world_size: int) -> float:
    """Optimal iteration time over every split into micro-batches and every grouping of each."""
    memo: dict[tuple[int, ...], float] = {}
    best = float("inf")
    for part in set_partitions(list(range(len(lengths)))):
        tot = 0.0
        for block in part:
            key = tuple(sorted(lengths[i] for i in block))
            if key not in memo:
                memo[key] = brute_micro_batch(list(key), cost, world_size)
            tot += memo[key]
            if tot >= best:
                break
        best = min(best, tot)
    return best
