"""GroupPool and the parallel_state patch on 4 gloo ranks."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed

GROUPS = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]


def _getters():
    from megatron.core import parallel_state as ps

    return (
        ps.get_context_parallel_world_size(),
        ps.get_context_parallel_rank(),
        list(ps.get_context_parallel_global_ranks()),
    )


def _pool_and_getters(rank, ws):
    from megatron.core import parallel_state as ps

    from flexsp_patches import parallel_state as fps
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.sp_group import sp_group

    pool = GroupPool(GROUPS)
    out = {"len": len(pool), "groups": pool.groups, "degrees": pool.degrees}
    out["group_of"] = {d: pool.group_of(rank, d) for d in (1, 2, 3, 4)}
    # Group membership and all-reduce inside each group this rank belongs to.
    sums = {}
    for g in GROUPS:
        if rank in g:
            t = torch.tensor([float(rank + 1)])
            dist.all_reduce(t, group=pool.get(g))
            sums[g] = t.item()
    out["sums"] = sums
    # Before entering: megatron's own state (no model parallel initialised) -> not initialised.
    out["before"] = ps._CONTEXT_PARALLEL_GROUP is None
    by_name = ps.get_context_parallel_world_size  # captured BEFORE install: the original function
    seen = {}
    for g in [(rank,), (0, 1) if rank < 2 else (2, 3), (0, 1, 2, 3)]:
        with sp_group(pool, g) as active:
            seen[g] = list(_getters()) + [ps.get_context_parallel_group() is pool.get(g), by_name(), active.rank]
            # nesting: inner group wins, outer comes back
            with sp_group(pool, (rank,)):
                inner = _getters()
            seen[g].append(inner)
            seen[g].append(_getters())
    out["seen"] = seen
    out["after_restored"] = ps._CONTEXT_PARALLEL_GROUP is None and ps._CONTEXT_PARALLEL_GLOBAL_RANKS is None
    fps.install()  # idempotent
    out["installed"] = fps.is_installed()
    # outside any group the wrapped getter defers to megatron (which asserts: not initialised)
    try:
        ps.get_context_parallel_group()
        out["outside"] = "no error"
    except AssertionError as e:
        out["outside"] = str(e)
    return out


def test_pool_groups_and_patched_getters():
    res = run_distributed(_pool_and_getters, 4, timeout=90)
    for rank, out in enumerate(res):
        assert out["len"] == len(GROUPS) and out["groups"] == GROUPS and out["degrees"] == [1, 2, 4]
        assert out["group_of"] == {1: (rank,), 2: (0, 1) if rank < 2 else (2, 3), 3: None, 4: (0, 1, 2, 3)}
        expect_sums = {g: float(sum(r + 1 for r in g)) for g in GROUPS if rank in g}
        assert out["sums"] == expect_sums
        assert out["before"] and out["after_restored"] and out["installed"]
        assert "not initialized" in out["outside"]
        pair = (0, 1) if rank < 2 else (2, 3)
        for g, vals in out["seen"].items():
            ws, r, ranks, same_group, by_name, active_rank, inner, after_inner = vals
            assert (ws, r, ranks) == (len(g), g.index(rank), list(g)), (rank, g, vals)
            assert same_group and by_name == len(g) and active_rank == g.index(rank)
            assert inner == (1, 0, [rank]) and after_inner == (ws, r, ranks)
        assert set(out["seen"]) == {(rank,), pair, (0, 1, 2, 3)}


def _bad_groups(rank, ws):
    from megatron.flexsp.runtime.group_pool import GroupPool, GroupPoolError
    from megatron.flexsp.runtime.sp_group import sp_group

    pool = GroupPool(GROUPS)
    errors = {}
    t0 = time.monotonic()
    # (1, 2) was never created: every rank must raise at once, no collective is attempted.
    try:
        with sp_group(pool, (1, 2)):
            dist.barrier()
        errors["absent"] = None
    except GroupPoolError as e:
        errors["absent"] = str(e)
    # A member-order the pool does not hold is a different group (positions are SP ranks).
    try:
        pool.get((1, 0))
        errors["order"] = None
    except GroupPoolError as e:
        errors["order"] = str(e)
    # Entering a pool group this rank is not part of.
    other = (2, 3) if rank < 2 else (0, 1)
    try:
        with sp_group(pool, other):
            pass
        errors["not_member"] = None
    except ValueError as e:
        errors["not_member"] = str(e)
    # A micro-batch whose groups do not partition the ranks.
    for name, groups in {
        "overlap": [(0, 1), (1,), (2, 3)],
        "missing": [(0, 1), (2,)],
        "absent_in_partition": [(0,), (1, 2), (3,)],
    }.items():
        try:
            pool.check_partition(groups)
            errors[name] = None
        except GroupPoolError as e:
            errors[name] = str(e)
    pool.check_partition([(0, 1), (2,), (3,)])  # a valid one passes
    errors["elapsed"] = time.monotonic() - t0
    dist.barrier()  # everyone is still alive and in step after the errors
    return errors


def _bad_pool_list(rank, ws):
    from megatron.flexsp.runtime.group_pool import GroupPool, GroupPoolError

    msgs = []
    # The premise of rejecting unsorted groups: torch numbers a group's ranks ascending whatever
    # order new_group was given, so position in the list is not the rank in the group.
    unsorted = dist.new_group([1, 0])
    premise = (dist.get_group_rank(unsorted, 1), dist.get_group_rank(unsorted, 0))
    for groups in ([(0, 1), (0, 1)], [(0, 4)], [(1, 1)], [()], [(0,), (1, 0)]):
        try:
            GroupPool(groups)
            msgs.append(None)
        except GroupPoolError as e:
            msgs.append(str(e))
    return msgs + [premise]


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_bad_groups_fail_on_every_rank_quickly():
    res = run_distributed(_bad_groups, 4, timeout=60, pg_timeout=30)
    for rank, e in enumerate(res):
        assert e["absent"] and "SP group [1, 2] is not in the group pool" in e["absent"], e
        assert e["order"] and "group [1, 0] is not in ascending rank order" in e["order"]
        assert e["not_member"] and f"rank {rank} cannot enter SP group" in e["not_member"]
        assert "rank 1 is in two groups" in e["overlap"]
        assert "ranks [3] are in no group" in e["missing"]
        assert "SP group [1, 2] is not in the group pool" in e["absent_in_partition"]
        assert e["elapsed"] < 5.0  # failed locally, no collective timeout involved


def test_bad_pool_lists_are_rejected():
    res = run_distributed(_bad_pool_list, 2, timeout=60)
    for msgs in res:
        assert "listed twice" in msgs[0]
        assert "outside the world 0..1" in msgs[1]
        assert "repeats a rank" in msgs[2]
        assert "empty group" in msgs[3]
        assert "group [1, 0] is not in ascending rank order" in msgs[4]
        assert msgs[5] == (1, 0)  # new_group([1, 0]): global rank 1 is rank 1 of the group, not 0


def _from_cost_model(rank, ws):
    from megatron.flexsp.planner.placement import candidate_groups
    from megatron.flexsp.planner.presets import preset
    from megatron.flexsp.runtime.group_pool import GroupPool

    cost = preset("cpu-tiny")
    pool = GroupPool.from_cost_model(cost, ws)
    return pool.groups, [tuple(g) for g in candidate_groups(cost, ws)]


def _aligned(rank, ws):
    from megatron.flexsp.runtime.group_pool import GroupPool, GroupPoolError

    try:
        GroupPool.aligned([3])
        err = None
    except GroupPoolError as e:
        err = str(e)
    return GroupPool.aligned([1, 2, 4, 2]).groups, err


def test_aligned_pool():
    for groups, err in run_distributed(_aligned, 4, timeout=60):
        assert groups == GROUPS
        assert "degrees [3] do not divide the world size 4" in err


def test_from_cost_model_matches_candidate_groups():
    res = run_distributed(_from_cost_model, 4, timeout=60)
    for groups, cands in res:
        assert groups == cands
        assert (0, 1, 2, 3) in groups and all((r,) in groups for r in range(4))
