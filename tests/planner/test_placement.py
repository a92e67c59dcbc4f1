"""Candidate SP groups and placement of degree multisets onto them (topology invariants of DESIGN.md)."""

import random

import pytest

from megatron.flexsp.planner.placement import can_place, candidate_groups, place_groups
from megatron.flexsp.planner.plan import PlanError
from megatron.flexsp.planner.presets import preset
from tests.planner._p1_util import degree_multisets, tiny_cost


def _topology_ok(group, gpn):
    nodes = {r // gpn for r in group}
    d = len(group)
    if d <= gpn:
        return len(nodes) == 1
    return d % gpn == 0 and len(nodes) == d // gpn


@pytest.mark.parametrize("name,ws", [("gpt-7b", 64), ("gpt-7b", 16), ("cpu-tiny", 4), ("gpt-13b", 8)])
def test_candidate_groups_are_aligned_blocks_with_valid_topology(name, ws):
    cost = preset(name, ws)
    cands = candidate_groups(cost, ws)
    allowed = cost.allowed_degrees(ws)
    # independent count: ws / d aligned blocks per allowed degree
    assert len(cands) == sum(ws // d for d in allowed)
    assert len(set(cands)) == len(cands)
    for g in cands:
        assert len(g) in allowed
        assert g == tuple(range(g[0], g[0] + len(g))) and g[0] % len(g) == 0
        assert _topology_ok(g, cost.gpus_per_node)
    # degree 1 included, and every rank is covered by one block of every allowed degree
    for d in allowed:
        blocks = [g for g in cands if len(g) == d]
        assert sorted(r for g in blocks for r in g) == list(range(ws))


def test_place_groups_every_multiset_of_64_partitions_ranks():
    cost = preset("gpt-7b", 64)
    cands = set(candidate_groups(cost, 64))
    rng = random.Random(0)
    multisets = degree_multisets(cost.allowed_degrees(64), 64)
    for degs in rng.sample(multisets, 300) + [[64], [1] * 64, [32, 16, 8, 4, 2, 1, 1]]:
        rng.shuffle(degs)
        groups = place_groups(degs, cost, 64)
        assert [len(g) for g in groups] == degs  # input order kept
        assert sorted(r for g in groups for r in g) == list(range(64))
        assert all(tuple(g) in cands for g in groups)


def test_place_groups_non_chain_degrees_uses_search():
    # 48 heads, 8 per node: degrees 16 and 24 are both allowed but neither divides the other
    cost = tiny_cost(gpus_per_node=8, heads=48)
    cost = cost.from_dict(
        {
            **cost.to_dict(),
            "alltoall": {
                "bytes_per_token": 1.0,
                "bandwidth_gbs": {"2": 1.0, "4": 1.0, "8": 1.0, "16": 1.0, "24": 1.0, "48": 1.0},
            },
        }
    )
    assert 24 in cost.allowed_degrees(48) and 16 in cost.allowed_degrees(48)
    cands = set(candidate_groups(cost, 48))
    for degs in ([24, 16, 8], [16, 16, 16], [24, 24], [16, 24, 8], [8, 16, 24]):
        groups = place_groups(degs, cost, 48)
        assert sorted(r for g in groups for r in g) == list(range(48))
        assert all(tuple(g) in cands for g in groups)
    # input order is free: the placement sorts by degree itself
    assert can_place([16, 8, 24], cost, 48)


def test_place_groups_rejects_bad_input():
    cost = preset("gpt-7b", 64)
    with pytest.raises(PlanError, match="sum to 60"):
        place_groups([32, 16, 8, 4], cost, 64)
    with pytest.raises(PlanError, match=r"degrees \[3\] are not allowed"):
        place_groups([32, 16, 8, 4, 3, 1], cost, 64)
    assert not can_place([32, 16, 8, 4], cost, 64)
