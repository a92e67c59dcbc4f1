"""Baseline megatron-dynamic-cp: hand-worked rounds, a per-rank reference of the rule, valid plans."""

import random

import pytest

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner.dynamic_cp import DcpRules, dynamic_cp_plan, dynamic_cp_rounds
from megatron.flexsp.planner.plan import NoFeasiblePlanError, estimate_plan_ms, validate_plan
from megatron.flexsp.planner.presets import preset


def shape(rounds):
    """Rounds as (size, sorted sequence ids) per group, in rank order."""
    return [[(g.size, sorted(i for i, _ in g.items)) for g in groups] for groups in rounds]


# ------------------------------------------------------------------ hand-worked from the rule's description


def test_long_sequence_first_then_short_ones_on_free_ranks_and_one_doubling():
    # 4000 tokens need 4 ranks (load 4e6, cap 4.2e6); the 1000s open groups of 1 on free ranks (a 1000 cannot
    # join the group of 4, its 5000 tokens would not fit); the two 500s share a group of 1; one rank stays
    # idle, so the first smallest group (the first 1000, ranks 4) doubles to 2.
    rules = DcpRules(total=8, per_rank=1000, sizes=(1, 2, 4, 8))
    assert shape(dynamic_cp_rounds([4000, 1000, 1000, 500, 500], rules)) == [
        [(4, [0]), (2, [1]), (1, [2]), (1, [3, 4])]
    ]


def test_a_sequence_that_finds_no_room_waits_for_the_next_micro_batch():
    # four full groups of 1; the fifth 1000 has no free rank and no group with room: next round, where it is
    # alone and its group doubles twice to fill the 4 ranks
    rules = DcpRules(total=4, per_rank=1000, sizes=(1, 2, 4))
    assert shape(dynamic_cp_rounds([1000] * 5, rules)) == [
        [(1, [0]), (1, [1]), (1, [2]), (1, [3])],
        [(4, [4])],
    ]


def test_when_no_group_can_double_the_round_becomes_one_full_width_group():
    # sizes without 4 (e.g. a head count that 4 does not divide): groups 2 + 1 -> 2 + 2, then no doubling to 4,
    # so the round is one group of all 8 ranks packing the longest sequences that fit
    rules = DcpRules(total=8, per_rank=1000, sizes=(1, 2, 8))
    assert shape(dynamic_cp_rounds([2000, 300, 300], rules)) == [[(8, [0, 1, 2])]]


def test_the_workload_cap_leaves_a_sequence_over_for_later():
    # 1000 on 1 rank: load 1e6, cap 1.05e6; the second 1000 cannot join it (2000 tokens > 1000) and opens a
    # group of 1 on the free rank; the third finds neither room nor a free rank at any size -> next round
    rules = DcpRules(total=2, per_rank=1000, sizes=(1, 2))
    assert shape(dynamic_cp_rounds([1000, 1000, 1000], rules)) == [[(1, [0]), (1, [1])], [(2, [2])]]


# ------------------------------------------------------------------ an independent per-rank reference


def _reference_need(L, per_rank, sizes):
    p = 1
    while p * per_rank < L:
        p *= 2
    return next((c for c in sizes if c >= p), None)


def _reference_round(pending, total, per_rank, sizes):
    """One round of the rule over per-rank state (each rank: its group id and load), as the source keeps it."""
    gid = [None] * total  # rank -> group id
    load = [0.0] * total
    members, tokens, items, size = {}, {}, {}, {}

    def place(g, ranks, c, item):
        if g not in members:
            members[g], tokens[g], items[g], size[g] = ranks, 0, [], c
            for r in ranks:
                gid[r] = g
        tokens[g] += item[1]
        items[g].append(item)
        for r in members[g]:
            load[r] += item[1] ** 2 / c

    cap = pending[0][1] * per_rank * 1.05
    c0 = _reference_need(pending[0][1], per_rank, sizes)
    place(0, list(range(c0)), c0, pending[0])
    left = []
    for item in pending[1:]:
        best = None
        c = _reference_need(item[1], per_rank, sizes)
        while c is not None and c <= total:
            if c in sizes:
                w = item[1] ** 2 / c
                for g in sorted(members):
                    if size[g] == c and tokens[g] + item[1] <= c * per_rank:
                        proj = max(load[r] + (w if gid[r] == g else 0) for r in range(total))
                        if proj <= cap and (best is None or proj < best[0]):
                            best = (proj, g, None, c)
                free = [r for r in range(total) if gid[r] is None]
                if len(free) >= c:
                    proj = max(max(load), w)
                    if proj <= cap and (best is None or proj < best[0]):
                        best = (proj, len(members), free[:c], c)
            c *= 2
        if best is None:
            left.append(item)
        else:
            place(best[1], best[2], best[3], item)
    # fill idle ranks: the layout in group order, doubling the first smallest group that can
    order = sorted(members, key=lambda g: members[g][0])
    sz = [size[g] for g in order]
    while sum(sz) < total:
        m = min(sz)
        t = min(2 * m, total)
        k = next((k for k in range(len(sz)) if sz[k] == m and sum(sz[:k]) + m - 1 + t - m < total), None)
        if t not in sizes or k is None:  # one full-width group instead
            keep, left, tok = [], [], 0
            for item in pending:
                if tok + item[1] <= total * per_rank:
                    keep.append(item)
                    tok += item[1]
                else:
                    left.append(item)
            return [(total, sorted(i for i, _ in keep))], left
        sz[k] = t
    return [(s, sorted(i for i, _ in items[g])) for s, g in zip(sz, order)], left


def reference_rounds(lengths, total, per_rank, sizes):
    pending = sorted(enumerate(lengths), key=lambda t: (-t[1], t[0]))
    out = []
    while pending:
        groups, pending = _reference_round(pending, total, per_rank, sizes)
        out.append(groups)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_rounds_match_the_per_rank_reference_on_small_cases(seed):
    rng = random.Random(seed)
    total = rng.choice([2, 4, 8])
    sizes = tuple(c for c in (1, 2, 4, 8) if c <= total and (c == total or rng.random() > 0.15))
    per_rank = 1000
    top = max(sizes)
    lengths = [rng.randint(50, per_rank * top) for _ in range(rng.randint(1, 10))]
    rules = DcpRules(total, per_rank, sizes)
    rounds = dynamic_cp_rounds(lengths, rules)
    assert shape(rounds) == reference_rounds(lengths, total, per_rank, sizes)
    seen = []
    for groups in rounds:
        assert sum(g.size for g in groups) == total  # every rank in every round
        for g in groups:
            assert g.size in sizes and g.items and g.tokens <= g.size * per_rank
            for _, L in g.items:  # the minimal power of two that holds it, or a doubling of it
                m = rules.min_size(L)
                assert g.size >= m and (g.size // m) & (g.size // m - 1) == 0
            seen += [i for i, _ in g.items]
    assert sorted(seen) == list(range(len(lengths)))


# ------------------------------------------------------------------ plans through the validator


@pytest.mark.parametrize(
    "name, world, n, max_len",
    [("cpu-tiny", 4, 16, 1500), ("gpt-7b", 64, 256, 196608), ("gpt-7b", 16, 64, 65536)],
)
def test_plans_are_valid_and_estimated_by_the_cost_model(name, world, n, max_len):
    cost = preset(name, world)
    lengths = [int(x) for x in longtail_lengths(n, max_len=max_len, seed=3)]
    lengths = [min(L, cost.capacity(world)) for L in lengths]
    plan = dynamic_cp_plan(lengths, cost, world)
    validate_plan(plan, cost, world_size=world, num_sequences=len(lengths))
    assert plan.estimated_time_ms == pytest.approx(estimate_plan_ms(plan, cost))
    assert plan.solver.method == "megatron-dynamic-cp" and plan.solver.extra["rounds"] == len(plan.micro_batches)
    for mb in plan.micro_batches:
        assert all(len(g.ranks) & (len(g.ranks) - 1) == 0 for g in mb.groups)


def test_a_sequence_no_group_holds_is_named():
    cost = preset("cpu-tiny")
    with pytest.raises(NoFeasiblePlanError) as e:
        dynamic_cp_plan([100, cost.capacity(4) + 1], cost, 4)
    assert e.value.lengths == [cost.capacity(4) + 1]
