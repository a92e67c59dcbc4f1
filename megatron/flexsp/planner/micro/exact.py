"""The exact micro-batch solver (small clusters): every group structure, branch and bound per structure.

Why exact where it can be: with at most ``EXACT_MAX_WORLD`` ranks the group structures
(multisets of allowed degrees summing to the world size that ``placement`` can put on aligned
blocks) are few (4 on 4 ranks, 36 on 16 ranks of 8-GPU nodes), so each is tried by branch and
bound over the sequence -> group assignment, best structure lower bound first, pruned by the
incumbent, by memory, by the GPU-ms bound and by symmetric empty groups. It returns the optimum
when it finishes before the deadline or its node budget (``extra["exact_proven"]``).
"""

from __future__ import annotations

import math

import numpy as np

from ..deadline import Deadline
from .context import MBSolution, PlannerContext

__all__ = ["exact_micro_batch", "mb_lower_bound"]


def mb_lower_bound(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray) -> float:
    """No micro-batch holding these sequences is faster: beta1 + max(slowest sequence at its best degree, GPU-ms / ranks)."""
    if L.size == 0:
        return 0.0
    d = np.asarray(ctx.degrees, dtype=np.float64)
    return ctx.beta1 + max(float(tau.min(axis=1).max()), float((tau * d[None, :]).min(axis=1).sum()) / ctx.world_size)


class _Stop(Exception):
    """Raised inside the branch and bound when the deadline or the node budget is spent."""


def exact_micro_batch(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    *,
    deadline: Deadline | None = None,
    upper: MBSolution | None = None,
    node_limit: int = 60_000,
) -> MBSolution | None:
    """Optimal groups for one micro-batch by enumerating group structures (small clusters; see module docstring).

    Returns the best solution found (``upper`` if nothing beats it, None if there is none);
    ``extra["exact_proven"]`` is True when the search finished, i.e. the result is optimal.
    Structures are tried in order of their lower bound, and the search stops at the first
    whose bound cannot beat the incumbent.
    """
    structs = ctx.structures()
    n = int(L.size)
    if structs is None or n == 0 or (deadline is not None and deadline.passed()):
        return upper
    # hardest sequences first: the incumbent is found, and the tree pruned, early (Python lists:
    # a micro-batch of a small cluster holds a handful of sequences, where numpy only adds overhead)
    rows = tau.tolist()
    order = sorted(range(n), key=lambda i: -min(rows[i]))
    rows = [rows[i] for i in order]
    bb = _BranchAndBound(
        ctx, [int(L[i]) for i in order], rows, upper.time_ms if upper is not None else math.inf, deadline, node_limit
    )
    best: tuple[tuple[int, ...], list[int]] | None = None
    cands = _ranked_structures(ctx, structs, rows, n)
    stopped = False
    for lb, st in cands:
        if lb >= bb.best_t * (1 - 1e-12) - 1e-9:
            break
        try:
            found = bb.run(st)
        except _Stop:
            found, stopped = bb.found, True
        if found is not None:
            best = (st, found)
        if stopped:
            break
    if best is None:
        return _kept_upper(upper, stopped)
    st, asg = best
    members: list[list[int]] = [[] for _ in st]
    for i, g in enumerate(asg):
        members[g].append(order[i])
    return MBSolution(
        [ctx.degrees[k] for k in st],
        members,
        float(bb.best_t),
        "exact",
        {"exact_proven": not stopped, "exact_nodes": bb.nodes},
        options=list(st),
    )


def _ranked_structures(
    ctx: PlannerContext, structs: list[tuple[int, ...]], rows: list[list[float]], n: int
) -> list[tuple[float, tuple[int, ...]]]:
    """(lower bound, structure) of the structures that can hold these sequences, best bound first."""
    beta1, ws = ctx.beta1, ctx.world_size
    cands = []
    degs = ctx.degrees
    for st in structs:
        ks = sorted(set(st))
        tmax = gpu = 0.0
        for row in rows:
            t = min(row[k] for k in ks)
            tmax = t if t > tmax else tmax
            gpu += min(row[k] * degs[k] for k in ks)
        if tmax == math.inf:
            continue
        if n >= len(st) and any(all(row[k] == math.inf for row in rows) for k in ks):
            continue  # a group no sequence fits would stay empty
        cands.append((beta1 + max(tmax, gpu / ws), st))
    cands.sort(key=lambda x: x[0])
    return cands


def _kept_upper(upper: MBSolution | None, stopped: bool) -> MBSolution | None:
    """Nothing beat ``upper``: a copy of it that says whether that is proven."""
    if upper is None:
        return None
    return MBSolution(
        list(upper.degrees),
        [list(m) for m in upper.members],
        upper.time_ms,
        upper.method,
        {**upper.extra, "exact_proven": not stopped},
        options=upper.options,
    )


class _BranchAndBound:
    """Depth-first search over sequence -> group assignments of one structure (see ``exact_micro_batch``)."""

    def __init__(
        self,
        ctx: PlannerContext,
        L: list[int],
        rows: list[list[float]],
        best_t: float,
        deadline: Deadline | None,
        node_limit: int,
    ):
        self.ctx, self.deadline, self.node_limit = ctx, deadline, node_limit
        self.n = len(L)
        self.L = L
        self.rows = rows
        self.best_t = best_t
        self.nodes = 0
        self.found: list[int] | None = None

    def run(self, st: tuple[int, ...]) -> list[int] | None:
        """Best assignment (group index per sequence) beating ``best_t``, or None; raises _Stop when out of budget."""
        ctx, n = self.ctx, self.n
        self.found = None
        self.t_l = [[row[k] for k in st] for row in self.rows]
        self.dg = [ctx.degrees[k] for k in st]
        self.st = st
        mingpu = [min(t * d for t, d in zip(row, self.dg)) for row in self.t_l]
        mint = [min(row) for row in self.t_l]
        self.rest_gpu = [0.0] * (n + 1)
        self.rest_max = [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            self.rest_gpu[i] = self.rest_gpu[i + 1] + mingpu[i]
            self.rest_max[i] = max(self.rest_max[i + 1], mint[i])
        G = len(st)
        self.cap = [float(ctx.caps[k]) for k in st]
        self.load = [0.0] * G
        self.tok = [0] * G
        self.cnt = [0] * G
        self.assign = [0] * n
        self.need_full = n >= G
        self._rec(0, 0.0, 0.0, G)
        return self.found

    def _rec(self, i: int, cur_max: float, used_gpu: float, empties: int) -> None:
        self.nodes += 1
        if self.nodes & 255 == 0 and (
            (self.deadline is not None and self.deadline.passed()) or self.nodes > self.node_limit
        ):
            raise _Stop
        beta1 = self.ctx.beta1
        cut = self.best_t * (1 - 1e-12) - 1e-12
        if i == self.n:
            if self.need_full and empties:
                return
            if beta1 + cur_max < cut:
                self.best_t = beta1 + cur_max
                self.found = list(self.assign)
            return
        if self.need_full and empties > self.n - i:
            return
        if beta1 + max(cur_max, self.rest_max[i], (used_gpu + self.rest_gpu[i]) / self.ctx.world_size) >= cut:
            return
        row, li, load, tok, cnt, dg, st = self.t_l[i], self.L[i], self.load, self.tok, self.cnt, self.dg, self.st
        tried: set[int] = set()
        opts = []
        for g in range(len(row)):
            t = row[g]
            if t == math.inf or tok[g] + li > self.cap[g]:
                continue
            if cnt[g] == 0:
                if st[g] in tried:  # empty groups of one option (degree and mode) are interchangeable
                    continue
                tried.add(st[g])
            nl = load[g] + t
            if beta1 + nl < cut:
                opts.append((nl, g))
        opts.sort()
        for nl, g in opts:
            if beta1 + nl >= self.best_t * (1 - 1e-12) - 1e-12:
                continue
            old = load[g]
            load[g] = nl
            tok[g] += li
            cnt[g] += 1
            self.assign[i] = g
            self._rec(
                i + 1, cur_max if cur_max >= nl else nl, used_gpu + dg[g] * row[g], empties - (1 if cnt[g] == 1 else 0)
            )
            load[g] = old
            tok[g] -= li
            cnt[g] -= 1
