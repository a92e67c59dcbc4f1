"""Start-up time of the SP group pool against its number of groups: eager vs lazy (issue 17, item 6).

Why: the pool holds a group per degree and aligned offset (2W - 1 groups on W ranks with every
power-of-two degree). An eager pool calls ``new_group`` once per group on every rank, each a
world-wide synchronisation; a lazy pool makes none at start-up, and later only the groups a rank
enters, synchronising only their members. This measures both on gloo ranks run as processes of
this machine, and counts the calls for larger worlds.

Per mode, every rank times ``init_process_group`` + building the pool + one world barrier; the
table shows the slowest rank's time (median over ``--repeats``) and its ratio to a pool of one
group. "first use" is the lazy pool entering every group it holds once (the cost moved out of
start-up), reported separately. The simulated rows count, per rank, the ``new_group`` calls at
start-up and the ranks each call waits for; the estimated seconds scale the measured per-call
cost of the eager run by the world size (its barrier is world-wide).

    python benchmarks/startup_bench.py                   # 16 gloo ranks, simulated 64 and 512
    python benchmarks/startup_bench.py --ranks 8 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import gc
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("one group", "eager", "lazy")


def aligned_groups(world: int) -> list[tuple[int, ...]]:
    """The pool of a run allowing every power-of-two degree: aligned blocks of each degree."""
    degrees = [d for d in (2**i for i in range(world.bit_length())) if world % d == 0]
    return [tuple(range(b, b + d)) for d in degrees for b in range(0, world, d)]


def _line_up(store, world: int, key: str) -> None:
    """Wait until every rank reached ``key`` (through the store: no process group is up)."""
    if store.add(key, 1) == world:  # the last to arrive opens the gate; the others block on it
        store.set(key + "/open", "1")
    store.wait([key + "/open"])


def _startup(store, rank: int, world: int, tag: str, mode: str) -> tuple[float, float]:
    """(start-up s, first-use s) of one mode on this rank; a fresh default group per call."""
    import torch
    import torch.distributed as dist

    from megatron.flexsp.runtime.group_pool import GroupPool

    timeout = datetime.timedelta(seconds=120)
    _line_up(store, world, f"{tag}go")  # every rank starts the clock together
    t0 = time.perf_counter()
    dist.init_process_group("gloo", store=dist.PrefixStore(tag, store), rank=rank, world_size=world, timeout=timeout)
    groups = [tuple(range(world))] if mode == "one group" else aligned_groups(world)
    pool = GroupPool(groups, lazy=mode == "lazy", timeout=timeout)
    dist.barrier()
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for g in pool.groups:  # every group in pool order: each rank enters its own
        if rank in g:
            dist.all_reduce(torch.ones(1), group=pool.get(g))
    dist.barrier()
    first_use = time.perf_counter() - t1
    worst = torch.tensor([startup, first_use], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    del pool
    gc.collect()
    time.sleep(0.3)  # let the torn-down groups' threads finish before the next mode's clock starts
    return float(worst[0]), float(worst[1])


def _worker(rank: int, world: int, port: int, repeats: int, out: mp.Queue) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    res = {m: [] for m in MODES}
    _startup(store, rank, world, "warm-up/", "one group")  # first connections and imports, not timed
    for r in range(repeats):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:  # rotated: no mode always goes first
            res[mode].append(_startup(store, rank, world, f"r{r}/{mode}/", mode))
    if rank == 0:
        out.put(res)


def measure(world: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Run every mode ``repeats`` times on ``world`` gloo processes; rank 0's max-over-ranks times."""
    from megatron.flexsp.launching import free_port

    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, repeats, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        res = out.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return res


def simulated(world: int, eager_call_s: float, measured_world: int) -> list[str]:
    """Per-rank ``new_group`` calls and ranks waited for, eager vs lazy, on ``world`` ranks."""
    groups = [g for g in aligned_groups(world) if len(g) < world]
    mine = [g for g in groups if 0 in g]
    est = len(groups) * eager_call_s * world / measured_world
    return [
        f"{world:>6} {'eager':>10} {len(groups) + 1:>7} {len(groups):>13} {len(groups) * world:>15} "
        f"{f'~{est:.1f} s (est.)':>16}",
        f"{world:>6} {'lazy':>10} {len(groups) + 1:>7} {0:>13} {0:>15} {'~0 s':>16}"
        f"   later: {len(mine)} groups, {sum(len(g) for g in mine)} ranks",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=16, help="gloo processes on this machine (default 16)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--simulate", type=int, nargs="*", default=[64, 512])
    args = ap.parse_args(argv)
    res = measure(args.ranks, args.repeats)
    med = {m: statistics.median(s for s, _ in res[m]) for m in MODES}
    use = {m: statistics.median(u for _, u in res[m]) for m in MODES}
    n = len(aligned_groups(args.ranks))
    print(f"start-up on {args.ranks} gloo ranks (processes on this machine), median of {args.repeats}")
    print(f"{'mode':>10} {'groups':>7} {'start-up s':>11} {'x one group':>12} {'first use s':>12}")
    for m in MODES:
        print(
            f"{m:>10} {1 if m == 'one group' else n:>7} {med[m]:>11.3f} {med[m] / med['one group']:>12.2f} {use[m]:>12.3f}"
        )
    eager_call_s = max(0.0, med["eager"] - med["one group"]) / max(1, n - 1)
    print(f"\nsimulated (per rank; eager cost per new_group measured above: {eager_call_s * 1e3:.1f} ms)")
    print(f"{'ranks':>6} {'mode':>10} {'groups':>7} {'start-up calls':>13} {'ranks waited on':>15} {'start-up':>16}")
    for w in args.simulate:
        for line in simulated(w, eager_call_s, args.ranks):
            print(line)
    ratio = med["lazy"] / med["one group"]
    print(f"\nlazy / one group = {ratio:.2f} (target <= 1.2): {'met' if ratio <= 1.2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
