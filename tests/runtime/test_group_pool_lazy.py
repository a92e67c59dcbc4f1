"""A lazy group pool makes no process group at start-up, each on its members' first use (issue 17, item 6).

Same collectives, same results as the eager pool; a rank makes only the groups it enters, and
only their members synchronise (``new_group(use_local_synchronization=True)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed

# Micro-batches of a plan: each a partition of the 4 ranks into pool groups.
PLAN = [[(0, 1), (2, 3)], [(0, 1, 2, 3)], [(0,), (1,), (2, 3)], [(0, 1), (2,), (3,)]]


def _body(rank: int, ws: int) -> dict:
    from megatron.flexsp.runtime.group_pool import GroupPool

    out = {}
    for lazy in (True, False):
        pool = GroupPool.aligned([1, 2, 4], lazy=lazy)
        at_start = pool.created
        sums = []
        for mb in PLAN:
            pool.check_partition(mb)
            mine = next(g for g in mb if rank in g)
            t = torch.tensor([float(rank + 1)])
            dist.all_reduce(t, group=pool.get(mine))
            sums.append(t.item())
        out[lazy] = dict(at_start=at_start, made=pool.created, sums=sums)
    return out


def test_lazy_pool_makes_groups_on_first_use_with_the_same_results():
    res = run_distributed(_body, 4, timeout=120)
    for rank, r in enumerate(res):
        lazy, eager = r[True], r[False]
        assert lazy["at_start"] == 0, "a lazy pool makes no group at start-up"
        assert eager["at_start"] == 6  # 4 singles + 2 pairs (the world group is reused)
        used = {g for mb in PLAN for g in mb if rank in g and len(g) < 4}
        assert lazy["made"] == len(used)
        assert lazy["sums"] == eager["sums"]
