"""Concrete groups of one micro-batch: deal the sequences onto groups of given degrees, then balance.

Why shared: the greedy, the MILP (whose class counts become sequences here) and the global
search's fill pass all turn "these group degrees" into "these members per group" the same way:
longest first onto the least loaded group with memory room (LPT; memory-first best fit when
that fragments memory), then a local search of moves and swaps out of the slowest group.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from ..deadline import Deadline
from ..placement import place_groups
from ..plan import PlanError
from .context import EPS, MBSolution, PlannerContext

__all__ = ["finish"]


class _Groups:
    """Mutable groups of one micro-batch with per-group load (sum tau) and tokens."""

    def __init__(self, ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, gk: Sequence[int]):
        self.ctx, self.L, self.tau = ctx, L, tau
        self.gk = np.asarray(gk, dtype=np.int64)  # degree index per group
        G = self.gk.size
        self.load = np.zeros(G)
        self.tok = np.zeros(G)
        self.cap = ctx.caps[self.gk]
        self.members: list[list[int]] = [[] for _ in range(G)]
        self.count = np.zeros(G, dtype=np.int64)
        self.where = np.full(L.size, -1, dtype=np.int64)

    def put(self, s: int, g: int) -> None:
        self.members[g].append(s)
        self.count[g] += 1
        self.load[g] += self.tau[s, self.gk[g]]
        self.tok[g] += self.L[s]
        self.where[s] = g

    def take(self, s: int) -> None:
        g = int(self.where[s])
        self.members[g].remove(s)
        self.count[g] -= 1
        self.load[g] -= self.tau[s, self.gk[g]]
        self.tok[g] -= self.L[s]
        if not self.members[g]:
            self.load[g] = 0.0
            self.tok[g] = 0.0
        self.where[s] = -1

    def times(self) -> np.ndarray:
        return np.where(self.count > 0, self.load + self.ctx.beta1, 0.0)

    def makespan(self) -> float:
        return float(self.times().max(initial=0.0))


def _assign_lpt(gr: _Groups, order: np.ndarray, cls: np.ndarray | None) -> bool:
    """Deal sequences (in ``order``) onto the group of least finish time with memory room.

    With ``cls`` a sequence first tries the groups of its class (a heap per class: within a
    class every group adds the same tau, so the least loaded one with room wins); then any group.
    """
    tau, L = gr.tau, gr.L
    heaps: dict[int, list[tuple[float, int]]] = {}
    if cls is not None:
        for g, k in enumerate(gr.gk.tolist()):
            heaps.setdefault(k, []).append((float(gr.load[g]), g))
        for h in heaps.values():
            heapq.heapify(h)
    Ll = L.tolist()
    cap = gr.cap.tolist()
    for s in order.tolist():
        if cls is not None:
            k = int(cls[s])
            h = heaps.get(k)
            placed = False
            if h and math.isfinite(tau[s, k]):
                skipped = []
                while h:
                    ld, g = heapq.heappop(h)
                    cur = float(gr.load[g])
                    if ld != cur:  # the group took a sequence of another class
                        heapq.heappush(h, (cur, g))
                        continue
                    if gr.tok[g] + Ll[s] <= cap[g] + EPS:
                        gr.put(s, g)
                        heapq.heappush(h, (float(gr.load[g]), g))
                        placed = True
                        break
                    skipped.append((ld, g))
                for item in skipped:
                    heapq.heappush(h, item)
            if placed:
                continue
        fin = gr.load + tau[s, gr.gk]
        ok = (gr.tok + L[s] <= gr.cap + EPS) & np.isfinite(fin)
        if not ok.any():
            return False
        gr.put(s, int(np.argmin(np.where(ok, fin, np.inf))))
    return True


def _assign_bfd(gr: _Groups, order: np.ndarray) -> bool:
    """Memory first: each sequence (longest first) into the group it fills best (least room left).

    For micro-batches packed close to the memory limit, where dealing by time fragments memory;
    the local search then balances time within what memory allows.
    """
    L = gr.L
    for s in order.tolist():
        room = gr.cap - gr.tok - L[s]
        ok = (room >= -EPS) & np.isfinite(gr.tau[s, gr.gk])
        if not ok.any():
            return False
        g = int(np.argmin(np.where(ok, room, np.inf)))
        gr.put(s, g)
    return True


def _best_move(gr: _Groups, g0: int, T0: float) -> tuple[str, int, int] | None:
    """The move of one of g0's members to another group that lowers g0's time most (first best in member order)."""
    tau, L, beta1 = gr.tau, gr.L, gr.ctx.beta1
    k0 = gr.gk[g0]
    # all moves of g0's members at once: [member, group]
    m0 = np.asarray(gr.members[g0], dtype=np.int64)
    rest = T0 - tau[m0, k0] if m0.size > 1 else np.zeros(m0.size)
    newg = gr.load[None, :] + tau[m0][:, gr.gk] + beta1
    ok = (gr.tok[None, :] + L[m0][:, None] <= gr.cap[None, :] + EPS) & np.isfinite(newg)
    ok[:, g0] = False
    cand = np.where(ok, np.maximum(newg, rest[:, None]), np.inf)
    j = int(np.argmin(cand))
    if cand.flat[j] < T0 - 1e-7:
        G = gr.gk.size
        return ("move", int(m0[j // G]), j % G)
    return None


def _best_swap(gr: _Groups, g0: int, T0: float) -> tuple[str, int, int] | None:
    """The swap of a member of g0 with a member of another group that lowers both below g0's time most."""
    tau, L, beta1 = gr.tau, gr.L, gr.ctx.beta1
    k0 = gr.gk[g0]
    m0 = np.asarray(gr.members[g0], dtype=np.int64)
    others = np.flatnonzero((gr.where >= 0) & (gr.where != g0))
    if not others.size:
        return None
    og = gr.where[others]
    ok_t = gr.gk[og]
    # g0 loses s, gains t; t's group loses t, gains s: [member s, other t]
    new0 = T0 - tau[m0, k0][:, None] + tau[others, k0][None, :]
    newo = (gr.load[og] + beta1 - tau[others, ok_t])[None, :] + tau[m0[:, None], ok_t[None, :]]
    mem_ok = (gr.tok[g0] - L[m0][:, None] + L[others][None, :] <= gr.cap[g0] + EPS) & (
        (gr.tok[og] - L[others])[None, :] + L[m0][:, None] <= gr.cap[og][None, :] + EPS
    )
    cand = np.where(mem_ok & np.isfinite(new0) & np.isfinite(newo), np.maximum(new0, newo), np.inf)
    j = int(np.argmin(cand))
    if cand.flat[j] < T0 - 1e-7:
        n_o = others.size
        return ("swap", int(m0[j // n_o]), int(others[j % n_o]))
    return None


def _rebalance(gr: _Groups, max_iter: int, deadline: Deadline | None = None) -> None:
    """Move or swap sequences out of the slowest group while that lowers it (exact lengths)."""
    mark = np.inf
    for it in range(max_iter):
        T = gr.times()
        g0 = int(np.argmax(T))
        T0 = float(T[g0])
        if it % 25 == 0:  # stalled: many groups share the makespan and each step gains little
            if T0 > mark * (1 - 1e-4):
                return
            mark = T0
        if it % 8 == 7 and deadline is not None and deadline.passed():
            return
        if not gr.members[g0]:
            return
        step = _best_move(gr, g0, T0) or _best_swap(gr, g0, T0)
        if step is None:
            return
        kind, s, x = step
        if kind == "move":
            gr.take(s)
            gr.put(s, x)
        else:
            gt = int(gr.where[x])
            gr.take(s)
            gr.take(x)
            gr.put(s, gt)
            gr.put(x, g0)


def _fix_empty(gr: _Groups) -> bool:
    """Give every empty group a sequence when the micro-batch has at least as many sequences as groups."""
    G = gr.gk.size
    n = gr.L.size
    if n < G:
        return True
    beta1 = gr.ctx.beta1
    for e in range(G):
        if gr.members[e]:
            continue
        best = (np.inf, -1)
        for g in range(G):
            if len(gr.members[g]) < 2:
                continue
            for s in gr.members[g]:
                if gr.L[s] > gr.cap[e] + EPS or not np.isfinite(gr.tau[s, gr.gk[e]]):
                    continue
                v = max(gr.tau[s, gr.gk[e]] + beta1, gr.load[g] - gr.tau[s, gr.gk[g]] + beta1)
                if v < best[0]:
                    best = (v, s)
        if best[1] < 0:
            return False
        s = best[1]
        gr.take(s)
        gr.put(s, e)
    return True


def finish(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    gk: list[int],
    cls: np.ndarray | None,
    method: str,
    rebalance_iters: int,
    deadline: Deadline | None = None,
) -> MBSolution | None:
    """Groups of the given degree indices -> concrete members -> rebalanced solution (None: failed)."""
    degs = [ctx.degrees[k] for k in gk]
    if sum(degs) != ctx.world_size:
        return None
    try:
        place_groups(degs, ctx.cost, ctx.world_size)
    except PlanError:
        return None
    gr = _Groups(ctx, L, tau, gk)
    pref = tau[np.arange(L.size), cls] if cls is not None else tau.min(axis=1)
    order = np.argsort(-pref, kind="stable")
    if not _assign_lpt(gr, order, cls):
        gr = _Groups(ctx, L, tau, gk)
        if not _assign_bfd(gr, np.argsort(-L, kind="stable")):
            return None
    if rebalance_iters > 0:
        _rebalance(gr, rebalance_iters, deadline)
    if not _fix_empty(gr):
        return None
    _rebalance(gr, rebalance_iters // 4 + 1, deadline)
    if L.size >= len(gk) and any(not m for m in gr.members):
        return None
    return MBSolution(degs, [list(m) for m in gr.members], gr.makespan(), method, options=[int(k) for k in gk])
