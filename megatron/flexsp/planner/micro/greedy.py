"""The greedy micro-batch solver (any world size): degree classes by bisection, dealt, then balanced.

Why greedy: on hundreds of ranks the group structures are too many to enumerate, and the
global search needs a micro-batch's time in milliseconds. A sequence's preferred degree is the
one of least GPU-ms (short ones: degree 1, no all-to-all). For a target time C each degree
class needs n_d(C) = max(ceil(time/C), groups memory needs) groups; a bisection (on log C)
finds the least C whose groups fit the ranks (a sequence too slow for C moves up a degree).
Left-over ranks become more groups where the per-group load is highest. Micro-batches with
few sequences also try every homogeneous structure. Every structure is dealt
(``groups.finish``); the local search runs on the two best dealt ones only, and not at all with
``quick=True``: the global search scores candidate cuts that way and searches only the cut it
keeps.
"""

from __future__ import annotations

import math

import numpy as np

from ..deadline import Deadline
from .context import EPS, MBSolution, PlannerContext
from .groups import finish

__all__ = ["greedy", "fill_left_over", "small_k"]


def small_k(L: np.ndarray, tau: np.ndarray) -> int:
    """Degree index of the smallest group the shortest sequence fits in."""
    return int(np.argmax(np.isfinite(tau[int(np.argmin(L))])))


def fill_left_over(
    ctx: PlannerContext, n_per: np.ndarray, load: np.ndarray, counts: np.ndarray, small_k: int = 0
) -> list[int]:
    """Degree indices of all groups: n_per[k] of each degree plus groups on the left-over ranks."""
    degs = ctx.degrees
    n_per = n_per.copy()
    left = ctx.world_size - int(sum(d * c for d, c in zip(degs, n_per)))
    while left > 0:
        best_k, best_v = -1, -1.0
        for k, d in enumerate(degs):
            if d <= left and n_per[k] < counts[k]:
                v = load[k] / max(n_per[k], 1)
                if v > best_v:
                    best_k, best_v = k, v
        if best_k < 0:
            # every class has a group per sequence: small groups that the local search (and the
            # fill pass) can give sequences to; a big empty group would invite short sequences
            # into an expensive all-to-all
            best_k = min(max(k for k, d in enumerate(degs) if d <= left), small_k)
        n_per[best_k] += 1
        left -= degs[best_k]
    gk: list[int] = []
    for k in range(len(degs) - 1, -1, -1):
        gk += [k] * int(n_per[k])
    return gk


def _greedy_structure(
    ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, pack_big: bool = False
) -> tuple[list[int], np.ndarray] | None:
    """Degree classes by bisection on the target time (see module docstring); (group degree indices, class)."""
    D = len(ctx.degrees)
    dvec = np.asarray(ctx.degrees, dtype=np.float64)
    gpu = tau * dvec[None, :]
    pref = np.argmin(gpu, axis=1)  # least GPU-ms degree (inf-safe: some degree fits)
    n = L.size
    rows = np.arange(n)
    half = ctx.caps / 2.0

    def structure(cp: float):
        # class: smallest degree >= pref whose tau fits cp
        okd = (tau <= cp + EPS) & (np.arange(D)[None, :] >= pref[:, None])
        if not okd.any(axis=1).all():
            return None
        cls = np.argmax(okd, axis=1)
        t = tau[rows, cls]
        load = np.bincount(cls, weights=t, minlength=D)
        tok = np.bincount(cls, weights=L.astype(np.float64), minlength=D)
        cnt = np.bincount(cls, minlength=D)
        # memory: sequences over half a group's capacity cannot share one; the rest fill by volume
        big = L[:, None] > half[None, :]
        nbig = np.bincount(cls, weights=big[rows, cls].astype(np.float64), minlength=D)
        room = np.bincount(cls, weights=np.where(big[rows, cls], ctx.caps[cls] - L, 0.0), minlength=D)
        small_tok = tok - np.bincount(cls, weights=np.where(big[rows, cls], L, 0).astype(np.float64), minlength=D)
        mem_need = np.ceil(tok / ctx.caps - 1e-9)
        if pack_big:
            mem_need = np.maximum(mem_need, nbig + np.ceil(np.maximum(small_tok - room, 0.0) / ctx.caps - 1e-9))
        need = np.maximum(np.ceil(load / cp - 1e-9), mem_need)
        need = np.where(cnt > 0, np.maximum(need, 1), 0)
        need = np.minimum(need, cnt)
        used = float((need * dvec).sum())
        return cls, need.astype(np.int64), load, cnt, used

    lo = max(float(tau.min(axis=1).max()), float(gpu.min(axis=1).sum()) / ctx.world_size, 1e-6)
    hi = lo
    for _ in range(60):
        r = structure(hi)
        if r is not None and r[4] <= ctx.world_size:
            break
        hi *= 1.5
    else:
        return None
    for _ in range(40):
        if hi - lo <= 2e-3 * hi:  # the local search absorbs what a finer target would change
            break
        mid = math.sqrt(lo * hi)
        r = structure(mid)
        if r is not None and r[4] <= ctx.world_size:
            hi = mid
        else:
            lo = mid
    cls, need, load, cnt, _ = structure(hi)
    return fill_left_over(ctx, need, load, cnt, small_k(L, tau)), cls


def greedy(
    ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, iters: int, quick: bool, deadline: Deadline | None
) -> MBSolution | None:
    """The greedy's candidate structures, all dealt, the two best locally searched (``quick``: none)."""
    cands: list[tuple[list[int], np.ndarray | None]] = []
    # two structures: memory by volume only, or also one group per sequence over half a
    # group's capacity; each dealt by class, else (memory fragmentation) over all groups
    seen = set()
    for pack_big in (False, True):
        st = _greedy_structure(ctx, L, tau, pack_big)
        if st is None:
            continue
        key = (tuple(st[0]), st[1].tobytes())
        if key not in seen:
            seen.add(key)
            cands.append(st)
    if L.size <= min(2 * ctx.world_size, 256):
        # few sequences: also every homogeneous structure (e.g. one big group for the longest
        # sequence and its company, which the class structure cannot express)
        kneed = int(np.argmax(np.isfinite(tau), axis=1).max())
        for k in range(kneed, len(ctx.degrees)):
            d = ctx.degrees[k]
            if ctx.world_size % d == 0:
                cands.append(([k] * (ctx.world_size // d), None))
    dealt: list[tuple[float, int, list[int], np.ndarray | None, MBSolution]] = []
    for i, (gk, cls) in enumerate(cands):
        sol = finish(ctx, L, tau, gk, cls, "greedy", 0, deadline)
        used = cls
        if sol is None and cls is not None:
            sol = finish(ctx, L, tau, gk, None, "greedy", 0, deadline)
            used = None
        if sol is not None:
            dealt.append((sol.time_ms, i, gk, used, sol))
    if not dealt:
        return None
    dealt.sort(key=lambda x: (x[0], x[1]))
    best = dealt[0][4]
    if quick or iters <= 0:
        return best
    # the local search on the two best dealt structures (it rarely reorders structures further down)
    for _, _, gk, used, _ in dealt[:2]:
        sol = finish(ctx, L, tau, gk, used, "greedy", iters, deadline)
        if sol is not None and sol.time_ms < best.time_ms - 1e-12:
            best = sol
    return best
