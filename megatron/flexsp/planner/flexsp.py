"""FlexSP planning of one global batch: blaster -> per-micro-batch groups -> placement -> Plan.

Pipeline (``plan_flexsp``; ``greedy_plan`` is steps 1-4 and 7):

1. Sort the sequences longest first and cut them into consecutive chunks, one micro-batch each
   (``blaster``): the paper's min-max token cut for M = M_min .. M_min+2, and a DP over cut
   points on estimated micro-batch times under memory budgets of 100/96/92/86 %. Every candidate
   cut is scored by solving its micro-batches with the greedy below; the best one is kept.
2. Greedy per micro-batch: a sequence's preferred degree is the one of least GPU-ms (short
   ones: degree 1, no all-to-all). For a target time C each degree class needs
   n_d(C) = max(ceil(time/C), groups memory needs) groups; bisection finds the least C whose
   groups fit the ranks (a sequence too slow for C moves up a degree). Left-over ranks become
   more groups where the per-group load is highest. Sequences are dealt longest first onto the
   least loaded group of their class with memory room (LPT; memory-first best fit when that
   fragments memory), then a local search moves / swaps sequences out of the slowest group while
   that lowers it (any degree, exact lengths). Micro-batches with few sequences also try every
   homogeneous structure (one big group can beat classes for a very long sequence).
3. Polish: moves and swaps of the longest sequences between micro-batches with few sequences,
   each re-solved, kept when the sum of times drops (a bounded number of evaluations).
4. Fill: a micro-batch whose time is set by a few long sequences has groups with spare time and
   memory; they take sequences from faster micro-batches (makespan unchanged), which are then
   re-solved, possibly vanishing (one micro-batch less).
5. MILP (``milp.py``) on the bucketed lengths of each micro-batch, cut off at the greedy value,
   in short time-limited shots; its counts become sequences by the dealing + local search of
   step 2, kept only when better. Then the best other cuts are re-scored with the MILP, filled
   and compared, within the time limit.
6. (same as 7) Degrees become ranks with ``placement.place_groups``.
7. The plan is validated before it is returned; it never is worse than ``greedy_plan``'s
   because steps 1-4 do not depend on the clock and the MILP only replaces what it beats.

Never fails when a plan exists: if no cut can be solved, the last resort is one sequence per
group at its smallest degree, groups packed first-fit into micro-batches, which is always
valid (left-over ranks are degree-1 groups, so there are more groups than sequences).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .blaster import ChunkEstimator, cut_points, min_max_chunks, segment
from .bounds import check_feasible, lower_bound_ms, min_micro_batches, seq_tau_table
from .bucketing import bucketize
from .costmodel import CostModel
from .milp import ClassProblem, solve_class_milp
from .placement import place_groups
from .plan import Group, MicroBatch, Plan, PlanError, SolverInfo, estimate_plan_ms, validate_plan

__all__ = ["plan_flexsp", "greedy_plan", "MBSolution", "solve_micro_batch", "PlannerContext"]

_EPS = 1e-9


@dataclass
class PlannerContext:
    """What every micro-batch solve needs, computed once per global batch."""

    cost: CostModel
    world_size: int
    degrees: list[int]
    caps: np.ndarray       # [D] tokens per group of each degree
    beta1: float
    milp_shots: tuple[float, ...] = (0.03, 0.12)   # MILP time limits tried per micro-batch

    @classmethod
    def build(cls, cost: CostModel, world_size: int) -> "PlannerContext":
        degs = cost.allowed_degrees(world_size)
        return cls(cost, world_size, degs, np.array([cost.capacity(d) for d in degs], dtype=np.float64),
                   cost.compute.beta1_ms)


@dataclass
class MBSolution:
    """One micro-batch: group degrees and their members (local indices into the chunk)."""

    degrees: list[int]
    members: list[list[int]]
    time_ms: float
    method: str = "greedy"
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- concrete groups

class _Groups:
    """Mutable groups of one micro-batch with per-group load (sum tau) and tokens."""

    def __init__(self, ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, gk: Sequence[int]):
        self.ctx, self.L, self.tau = ctx, L, tau
        self.gk = np.asarray(gk, dtype=np.int64)             # degree index per group
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

    With ``cls`` a sequence first tries the groups of its class; then any group.
    """
    tau, L = gr.tau, gr.L
    for s in order.tolist():
        fin = gr.load + tau[s, gr.gk]
        room = gr.tok + L[s] <= gr.cap + _EPS
        ok = room & np.isfinite(fin)
        if cls is not None:
            mine = ok & (gr.gk == cls[s])
            if mine.any():
                ok = mine
        if not ok.any():
            return False
        g = int(np.argmin(np.where(ok, fin, np.inf)))
        gr.put(s, g)
    return True


def _assign_bfd(gr: _Groups, order: np.ndarray) -> bool:
    """Memory first: each sequence (longest first) into the group it fills best (least room left).

    For micro-batches packed close to the memory limit, where dealing by time fragments memory;
    the local search then balances time within what memory allows.
    """
    L = gr.L
    for s in order.tolist():
        room = gr.cap - gr.tok - L[s]
        ok = (room >= -_EPS) & np.isfinite(gr.tau[s, gr.gk])
        if not ok.any():
            return False
        g = int(np.argmin(np.where(ok, room, np.inf)))
        gr.put(s, g)
    return True


def _rebalance(gr: _Groups, max_iter: int) -> None:
    """Move or swap sequences out of the slowest group while that lowers it (exact lengths)."""
    tau, L = gr.tau, gr.L
    beta1 = gr.ctx.beta1
    mark = np.inf
    for it in range(max_iter):
        T = gr.times()
        g0 = int(np.argmax(T))
        T0 = float(T[g0])
        if it % 25 == 0:  # stalled: many groups share the makespan and each step gains little
            if T0 > mark * (1 - 1e-4):
                return
            mark = T0
        k0 = gr.gk[g0]
        best = (T0 - 1e-7, None, None)
        mem0 = gr.members[g0]
        if len(mem0) >= 1:
            for s in mem0:
                rest = T0 - tau[s, k0] if len(mem0) > 1 else 0.0
                newg = gr.load + tau[s, gr.gk] + beta1
                ok = (gr.tok + L[s] <= gr.cap + _EPS) & np.isfinite(newg)
                ok[g0] = False
                if not ok.any():
                    continue
                cand = np.where(ok, np.maximum(newg, rest), np.inf)
                g = int(np.argmin(cand))
                if cand[g] < best[0]:
                    best = (float(cand[g]), ("move", s, g), None)
        if best[1] is None and len(mem0) >= 1:
            others = np.flatnonzero((gr.where >= 0) & (gr.where != g0))
            if others.size:
                og = gr.where[others]
                ok_t = gr.gk[og]
                for s in mem0:
                    # g0 loses s, gains t; t's group loses t, gains s
                    new0 = T0 - tau[s, k0] + tau[others, k0]
                    newo = gr.load[og] + beta1 - tau[others, ok_t] + tau[s, ok_t]
                    mem_ok = ((gr.tok[g0] - L[s] + L[others] <= gr.cap[g0] + _EPS)
                              & (gr.tok[og] - L[others] + L[s] <= gr.cap[og] + _EPS))
                    cand = np.where(mem_ok & np.isfinite(new0) & np.isfinite(newo), np.maximum(new0, newo), np.inf)
                    j = int(np.argmin(cand))
                    if cand[j] < best[0]:
                        best = (float(cand[j]), ("swap", s, int(others[j])), None)
        if best[1] is None:
            return
        kind, s, x = best[1]
        if kind == "move":
            gr.take(s)
            gr.put(s, x)
        else:
            t = x
            gt = int(gr.where[t])
            gr.take(s)
            gr.take(t)
            gr.put(s, gt)
            gr.put(t, g0)


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
                if gr.L[s] > gr.cap[e] + _EPS or not np.isfinite(gr.tau[s, gr.gk[e]]):
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


def _finish(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, gk: list[int], cls: np.ndarray | None,
            method: str, rebalance_iters: int) -> MBSolution | None:
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
    _rebalance(gr, rebalance_iters)
    if not _fix_empty(gr):
        return None
    _rebalance(gr, rebalance_iters // 4 + 1)
    if L.size >= len(gk) and any(not m for m in gr.members):
        return None
    return MBSolution(degs, [list(m) for m in gr.members], gr.makespan(), method)


def _small_k(L: np.ndarray, tau: np.ndarray) -> int:
    """Degree index of the smallest group the shortest sequence fits in."""
    return int(np.argmax(np.isfinite(tau[int(np.argmin(L))])))


def _fill_left_over(ctx: PlannerContext, n_per: np.ndarray, load: np.ndarray, counts: np.ndarray,
                    small_k: int = 0) -> list[int]:
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


def _greedy_structure(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray,
                      pack_big: bool = False) -> tuple[list[int], np.ndarray] | None:
    """Degree classes by bisection on the target time (see module docstring); (group degree indices, class)."""
    D = len(ctx.degrees)
    dvec = np.asarray(ctx.degrees, dtype=np.float64)
    gpu = tau * dvec[None, :]
    pref = np.argmin(gpu, axis=1)                       # least GPU-ms degree (inf-safe: some degree fits)
    n = L.size
    rows = np.arange(n)
    half = ctx.caps / 2.0

    def structure(cp: float):
        # class: smallest degree >= pref whose tau fits cp
        okd = (tau <= cp + _EPS) & (np.arange(D)[None, :] >= pref[:, None])
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
        if hi - lo <= 1e-4 * hi:
            break
        mid = 0.5 * (lo + hi)
        r = structure(mid)
        if r is not None and r[4] <= ctx.world_size:
            hi = mid
        else:
            lo = mid
    cls, need, load, cnt, _ = structure(hi)
    return _fill_left_over(ctx, need, load, cnt, _small_k(L, tau)), cls


def solve_micro_batch(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, *, use_milp: bool = False,
                      time_limit_s: float = 0.5, upper: MBSolution | None = None,
                      rebalance_iters: int | None = None, bucket_error: float = 0.02,
                      max_buckets: int | None = 14, milp_span: int | None = 2) -> MBSolution | None:
    """Best groups for one micro-batch (``L`` lengths, ``tau`` their tau table); None if the heuristics fail."""
    iters = rebalance_iters if rebalance_iters is not None else min(2 * L.size + 20, 400)
    best = upper
    if best is None:
        # two structures: memory by volume only, or also one group per sequence over half a
        # group's capacity; each dealt by class, else (memory fragmentation) over all groups
        seen = set()
        for pack_big in (False, True):
            st = _greedy_structure(ctx, L, tau, pack_big)
            if st is None:
                continue
            key = (tuple(st[0]), st[1].tobytes())
            if key in seen:
                continue
            seen.add(key)
            sol = _finish(ctx, L, tau, st[0], st[1], "greedy", iters)
            if sol is None:
                sol = _finish(ctx, L, tau, st[0], None, "greedy", iters)
            if sol is not None and (best is None or sol.time_ms < best.time_ms):
                best = sol
        if L.size <= min(2 * ctx.world_size, 256):
            # few sequences: also every homogeneous structure (e.g. one big group for the longest
            # sequence and its company, which the class structure cannot express)
            kneed = int(np.argmax(np.isfinite(tau), axis=1).max())
            for k in range(kneed, len(ctx.degrees)):
                d = ctx.degrees[k]
                if ctx.world_size % d:
                    continue
                sol = _finish(ctx, L, tau, [k] * (ctx.world_size // d), None, "greedy", iters)
                if sol is not None and (best is None or sol.time_ms < best.time_ms):
                    best = sol
    if not use_milp or L.size == 0:
        return best
    # ---- MILP on buckets
    bk = bucketize(L, max_error=bucket_error, breaks=[int(c) for c in ctx.caps], max_buckets=max_buckets,
                   max_atoms=400)
    B, D = bk.num_buckets, len(ctx.degrees)
    tmean = np.zeros((B, D))
    tmax = np.zeros((B, D))
    lmean = np.zeros(B)
    lmin = np.zeros(B)
    for b in range(B):
        mem = bk.members(b)
        tmean[b] = tau[mem].mean(axis=0)
        tmax[b] = tau[mem].max(axis=0)
        lmean[b] = L[mem].mean()
        lmin[b] = L[mem].min()
    if milp_span is not None:
        # smaller model: a bucket may use its smallest feasible degree, the next ``milp_span``
        # ones, and the largest (this makes the MILP a restriction; milp_span=None keeps all)
        fin = np.isfinite(tmax)
        kmin = np.argmax(fin, axis=1)
        ks = np.arange(D)[None, :]
        keep = (ks <= kmin[:, None] + milp_span) | (ks == D - 1)
        tmax = np.where(keep, tmax, np.inf)
        tmean = np.where(keep, tmean, np.inf)
    prob = ClassProblem(bk.counts, tmean, tmax, lmean, ctx.degrees, ctx.caps, ctx.world_size, lmin)
    up = best.time_ms - ctx.beta1 if best is not None else None
    sol = solve_class_milp(prob, upper=up, time_limit_s=time_limit_s)
    info = {"milp_status": sol.status, "milp_time_s": sol.solve_time_s, "buckets": B}
    if not np.isfinite(sol.cprime):
        if best is not None:
            best.extra.update(info)
        return best
    # bucket counts -> concrete sequences: longest members of a bucket go to its largest class
    cls = np.zeros(L.size, dtype=np.int64)
    for b in range(B):
        mem = bk.members(b)
        mem = mem[np.argsort(-L[mem], kind="stable")]
        pos = 0
        for k in range(D - 1, -1, -1):
            c = int(sol.y[b, k])
            cls[mem[pos:pos + c]] = k
            pos += c
    load = np.array([(np.where(sol.y[:, k] > 0, tmean[:, k], 0.0) * sol.y[:, k]).sum() for k in range(D)])
    cnt = sol.y.sum(axis=0)
    gk = _fill_left_over(ctx, sol.n.astype(np.int64), load, cnt, _small_k(L, tau))
    cand = _finish(ctx, L, tau, gk, cls, "milp", iters)
    if cand is not None:
        cand.extra.update(info)
        cand.extra["milp_bound_ms"] = sol.cprime + ctx.beta1
    if cand is not None and (best is None or cand.time_ms < best.time_ms - 1e-9):
        return cand
    if best is not None:
        best.extra.update(info)
    return best


# ------------------------------------------------------------------------------- global batch

def _safe_plan(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray) -> list[tuple[np.ndarray, MBSolution]]:
    """Always-valid last resort: one sequence per group at its smallest degree, first-fit into micro-batches."""
    kmin = np.argmax(np.isfinite(tau), axis=1)
    order = np.argsort(-L, kind="stable")
    mbs: list[list[int]] = []
    used: list[int] = []
    for s in order.tolist():
        d = ctx.degrees[kmin[s]]
        for m in range(len(mbs)):
            if used[m] + d <= ctx.world_size:
                mbs[m].append(s)
                used[m] += d
                break
        else:
            mbs.append([s])
            used.append(d)
    out = []
    for m, seqs in enumerate(mbs):
        degs = [ctx.degrees[kmin[s]] for s in seqs] + [1] * (ctx.world_size - used[m])
        members = [[j] for j in range(len(seqs))] + [[] for _ in range(ctx.world_size - used[m])]
        idx = np.asarray(seqs, dtype=np.int64)
        t = max(ctx.beta1 + tau[s, kmin[s]] for s in seqs)
        out.append((idx, MBSolution(degs, members, float(t), "safe")))
    return out


def _group_arrays(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, sol: MBSolution):
    """Per-group degree index, load (sum tau), tokens of a micro-batch solution."""
    kidx = {d: k for k, d in enumerate(ctx.degrees)}
    gk = np.array([kidx[d] for d in sol.degrees], dtype=np.int64)
    load = np.array([tau[m, k].sum() if m else 0.0 for m, k in zip(sol.members, gk)])
    tok = np.array([L[m].sum() if m else 0.0 for m in sol.members], dtype=np.float64)
    return gk, load, tok


def _fill_pass(ctx: PlannerContext, Ls: np.ndarray, taus: np.ndarray, mbs: list[list],
               deadline: float) -> int:
    """Pull sequences into the idle room of slower micro-batches; re-solve the micro-batches they left.

    ``mbs`` is a list of [idx (positions in the sorted batch), MBSolution], changed in place.
    A micro-batch whose makespan is set by a few long sequences has groups with spare time
    and memory; filling them with sequences of faster micro-batches leaves its makespan
    unchanged and shortens the donors (or empties them: one micro-batch less). Kept only when
    the total improves. Returns the number of accepted pulls.
    """
    accepted = 0
    beta1 = ctx.beta1
    a = 0
    while a < len(mbs):
        if time.perf_counter() > deadline:
            break
        mbs.sort(key=lambda x: -x[1].time_ms)
        idx_a, sol_a = mbs[a]
        T = sol_a.time_ms
        gk, load, tok = _group_arrays(ctx, Ls[idx_a], taus[idx_a], sol_a)
        cap = ctx.caps[gk]
        tslack = T - beta1 - load
        mslack = cap - tok
        donors = list(range(a + 1, len(mbs)))
        if not donors:
            break
        pool = np.concatenate([mbs[b][0] for b in donors])
        owner = np.concatenate([np.full(mbs[b][0].size, b) for b in donors])
        order = np.argsort(-Ls[pool], kind="stable")
        pulled: list[tuple[int, int]] = []      # (position in sorted batch, group of a)
        min_need = np.inf
        for q in order.tolist():
            s = int(pool[q])
            if Ls[s] < min_need and not (mslack >= Ls[s]).any():
                break
            tt = taus[s, gk]
            ok = (mslack >= Ls[s] - _EPS) & (tslack >= tt - _EPS)
            if not ok.any():
                continue
            g = int(np.argmin(np.where(ok, tslack - tt, np.inf)))   # best fit in time
            tslack[g] -= tt[g]
            mslack[g] -= Ls[s]
            pulled.append((q, g))
        if not pulled:
            a += 1
            continue
        # tentative: new a (same makespan) and re-solved donors
        take = {int(pool[q]) for q, _ in pulled}
        new_members = [list(m) for m in sol_a.members]
        new_idx = list(idx_a.tolist())
        for q, g in pulled:
            new_members[g].append(len(new_idx))
            new_idx.append(int(pool[q]))
        touched = sorted({int(owner[q]) for q, _ in pulled})
        old_total = T + sum(mbs[b][1].time_ms for b in touched)
        new_total = T
        new_donors = {}
        fail = False
        for b in touched:
            rest = np.array([s for s in mbs[b][0].tolist() if s not in take], dtype=np.int64)
            if rest.size == 0:
                new_donors[b] = None
                continue
            sol = solve_micro_batch(ctx, Ls[rest], taus[rest])
            if sol is None:
                fail = True
                break
            new_donors[b] = (rest, sol)
            new_total += sol.time_ms
        if fail or new_total >= old_total - 1e-6:
            a += 1
            continue
        sol_new = MBSolution(list(sol_a.degrees), new_members, T, sol_a.method, dict(sol_a.extra))
        mbs[a] = [np.asarray(new_idx, dtype=np.int64), sol_new]
        for b in sorted(touched, reverse=True):
            if new_donors[b] is None:
                del mbs[b]
            else:
                mbs[b] = list(new_donors[b])
        accepted += 1
        # same a again: its room may be used by what remains
    return accepted


def _polish(ctx: PlannerContext, Ls: np.ndarray, taus: np.ndarray, mbs: list[list], max_evals: int = 120,
            small: int = 48, top: int = 6) -> int:
    """Move or swap long sequences between micro-batches with few sequences (the head of the batch).

    Consecutive cuts of the sorted batch put the longest sequences together; which of them
    share a micro-batch decides how well their groups balance, so the planner tries moving each
    of the ``top`` longest sequences of a small micro-batch to another small one (and swapping
    pairs), re-solving both, and keeps changes that lower the sum. Bounded by ``max_evals``
    re-solved pairs, not by the clock, so the greedy plan stays deterministic.
    """
    evals = 0
    accepted = 0
    memo: dict[tuple[int, ...], MBSolution | None] = {}

    def solve(idx: np.ndarray) -> MBSolution | None:
        key = tuple(sorted(idx.tolist()))
        if key not in memo:
            memo[key] = solve_micro_batch(ctx, Ls[idx], taus[idx])
        return memo[key]

    improved = True
    while improved and evals < max_evals:
        improved = False
        heads = [m for m in range(len(mbs)) if mbs[m][0].size <= small]
        heads.sort(key=lambda m: -mbs[m][1].time_ms)
        for a in heads:
            ia = mbs[a][0]
            longest = ia[np.argsort(-Ls[ia], kind="stable")][:top]
            for b in heads:
                if b == a or evals >= max_evals:
                    continue
                ib = mbs[b][0]
                old = mbs[a][1].time_ms + mbs[b][1].time_ms
                best = None
                for s_ in longest.tolist():
                    # move s to b
                    na = ia[ia != s_]
                    nb = np.append(ib, s_)
                    evals += 1
                    sa = solve(na) if na.size else None
                    sb = solve(nb)
                    if sb is not None and (sa is not None or na.size == 0):
                        t = (sa.time_ms if sa is not None else 0.0) + sb.time_ms
                        if t < old - 1e-6 and (best is None or t < best[0]):
                            best = (t, na, sa, nb, sb)
                    # swap s with the longest of b shorter than s
                    cand = ib[Ls[ib] < Ls[s_]]
                    if cand.size:
                        t_ = int(cand[np.argmax(Ls[cand])])
                        na2 = np.append(ia[ia != s_], t_)
                        nb2 = np.append(ib[ib != t_], s_)
                        evals += 1
                        sa2, sb2 = solve(na2), solve(nb2)
                        if sa2 is not None and sb2 is not None:
                            t = sa2.time_ms + sb2.time_ms
                            if t < old - 1e-6 and (best is None or t < best[0]):
                                best = (t, na2, sa2, nb2, sb2)
                if best is not None:
                    _, na, sa, nb, sb = best
                    mbs[b] = [nb, sb]
                    if na.size:
                        mbs[a] = [na, sa]
                    else:
                        del mbs[a]
                    accepted += 1
                    improved = True
                    break
            if improved:
                break
    return accepted


def _candidate_splits(ctx: PlannerContext, Ls: np.ndarray, taus: np.ndarray) -> list[tuple[str, list[np.ndarray]]]:
    """Candidate splits of the sorted batch (positions 0..n-1) into micro-batches.

    Consecutive cuts of the sorted batch (``blaster``). (Dealing the longest sequences one per
    micro-batch among short ones was tried and lost on long-tail batches: memory then forces
    the long sequence into a group too small to keep pace with the rest.)
    """
    n = Ls.size
    out: list[tuple[str, list[np.ndarray]]] = []
    seen: set[tuple[int, ...]] = set()
    mmin = min_micro_batches(Ls, ctx.cost, ctx.world_size)
    pts = cut_points(Ls)
    est = ChunkEstimator(Ls, ctx.cost, ctx.world_size, taus, ctx.degrees)
    cuts: list[tuple[str, list[int]]] = []
    for frac in (1.0, 0.96, 0.92, 0.86):
        b, _ = segment(pts, lambda i, j, f=frac: est.cost(i, j, f))
        if b:
            cuts.append((f"dp{frac:g}", b))
    for m in range(mmin, mmin + 3):
        if m <= n:
            b, _ = min_max_chunks(Ls, m)
            cuts.append((f"minmax{m}", b))
    for name, b in cuts:
        if tuple(b) not in seen:
            seen.add(tuple(b))
            out.append((name, [np.arange(x, y) for x, y in zip(b[:-1], b[1:])]))
    return out


def _milp_shots(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray, sol: MBSolution, deadline: float,
                shots: Sequence[float] | None = None) -> MBSolution:
    """Improve a micro-batch with short MILP solves (the MILP's incumbents are concretised and kept when better).

    Short limits are enough: the aggregate model's optimum is not always the best concrete
    plan, so an early incumbent is as useful as a proven optimum; a second, longer shot runs
    only when the first was cut off.
    """
    best = sol
    statuses = []
    if shots is None:
        shots = ctx.milp_shots
    for tl in shots:
        left = deadline - time.perf_counter()
        if left < 0.01:
            statuses.append("skipped")
            break
        new = solve_micro_batch(ctx, L, tau, use_milp=True, time_limit_s=min(tl, left), upper=best)
        st = new.extra.get("milp_status", "none")
        statuses.append(st)
        if new.time_ms < best.time_ms - 1e-9:
            best = new
        if st != "time_limit":
            break
    best = MBSolution(best.degrees, best.members, best.time_ms, best.method, dict(best.extra))
    best.extra["milp_statuses"] = statuses
    return best


def _plan_chunks(ctx: PlannerContext, lengths: np.ndarray, *, use_milp: bool, t0: float,
                 time_limit_s: float) -> tuple[list[tuple[np.ndarray, MBSolution]], dict]:
    """Micro-batches of the batch: greedy over candidate cuts + fill pass, then (use_milp) the MILP.

    The greedy part does not depend on the clock (the same batch gives the same greedy plan),
    and the MILP only ever replaces a micro-batch or a whole cut by a better one, so the FlexSP
    plan is never worse than ``greedy_plan``'s.
    """
    deadline = t0 + time_limit_s
    order = np.argsort(-lengths, kind="stable")
    Ls = lengths[order]
    taus = seq_tau_table(Ls, ctx.cost, ctx.degrees)
    cache: dict[bytes, MBSolution | None] = {}
    mcache: dict[bytes, MBSolution] = {}

    def solve(idx: np.ndarray) -> MBSolution | None:
        key = idx.tobytes()
        if key not in cache:
            cache[key] = solve_micro_batch(ctx, Ls[idx], taus[idx])
        return cache[key]

    def improve(idx: np.ndarray, until: float) -> MBSolution:
        key = idx.tobytes()
        if key not in mcache:
            mcache[key] = _milp_shots(ctx, Ls[idx], taus[idx], cache[key], until)
        return mcache[key]

    def total(mbs) -> float:
        return float(sum(sol.time_ms for _, sol in mbs))

    # 1. every candidate split, scored by the greedy
    def repaired(idx: np.ndarray, depth: int = 0) -> list[np.ndarray] | None:
        """``idx`` if the greedy solves it, else its two halves (by tokens), recursively."""
        if solve(idx) is not None:
            return [idx]
        if idx.size < 2 or depth > 12:
            return None
        b, _ = min_max_chunks(Ls[idx], 2)
        left = repaired(idx[:b[1]], depth + 1)
        right = repaired(idx[b[1]:], depth + 1) if left is not None else None
        return None if right is None else left + right

    scored: list[tuple[float, str, list[np.ndarray]]] = []
    for name, parts in _candidate_splits(ctx, Ls, taus):
        # a micro-batch the greedy cannot pack (memory too tight) is split in two, not dropped
        fixed: list[np.ndarray] = []
        for idx in parts:
            r = repaired(idx)
            if r is None:
                fixed = []
                break
            fixed += r
        if fixed:
            scored.append((sum(cache[i.tobytes()].time_ms for i in fixed), name, fixed))
    info: dict = {"cuts_tried": len(scored)}
    if not scored:
        safe = _safe_plan(ctx, Ls, taus)
        info["cut"] = "safe"
        return [(order[idx], sol) for idx, sol in safe], info
    scored.sort(key=lambda x: x[0])
    # 2. greedy plan: best split, polished, then pull sequences into idle room of slow micro-batches
    _, name, parts = scored[0]
    best = [[idx, cache[idx.tobytes()]] for idx in parts]
    info["polish_moves"] = _polish(ctx, Ls, taus, best)
    info["fill_pulls"] = _fill_pass(ctx, Ls, taus, best, t0 + 10.0 * time_limit_s)
    info["cut"] = name
    if use_milp:
        # 3. MILP per micro-batch of the greedy plan (slowest first)
        for m in sorted(range(len(best)), key=lambda m: -best[m][1].time_ms):
            idx, sol = best[m]
            best[m][1] = _milp_shots(ctx, Ls[idx], taus[idx], sol, t0 + 0.4 * time_limit_s)
        # 4. the best few cuts re-scored with the MILP, filled, compared
        soft = t0 + 0.4 * time_limit_s
        for _, name2, parts2 in scored[:3]:
            if time.perf_counter() > soft:
                break
            parts2 = sorted(parts2, key=lambda idx: -cache[idx.tobytes()].time_ms)
            cand = [[idx, improve(idx, soft)] for idx in parts2]
            _fill_pass(ctx, Ls, taus, cand, soft)
            for m in range(len(cand)):
                idx, sol = cand[m]
                if "milp_statuses" not in sol.extra and time.perf_counter() < soft:
                    cand[m][1] = _milp_shots(ctx, Ls[idx], taus[idx], sol, soft)
            if total(cand) < total(best) - 1e-9:
                best, info["cut"] = cand, name2 + "+milp"
        statuses = [st for _, sol in best for st in sol.extra.get("milp_statuses", ["skipped"])]
        info["milp_statuses"] = statuses
        info["milp_improved"] = sum(sol.method == "milp" for _, sol in best)
    return [(order[idx], sol) for idx, sol in best], info


def _to_plan(ctx: PlannerContext, lengths: np.ndarray, chunks: list[tuple[np.ndarray, MBSolution]]) -> Plan:
    mbs = []
    for idx, sol in chunks:
        ranks = place_groups(sol.degrees, ctx.cost, ctx.world_size)
        groups = [Group(list(r), [int(idx[j]) for j in mem]) for r, mem in zip(ranks, sol.members)]
        groups.sort(key=lambda g: g.ranks[0])
        mbs.append(MicroBatch(groups))
    return Plan(ctx.world_size, [int(x) for x in lengths], mbs)


def _run(lengths: Sequence[int], cost: CostModel, world_size: int, *, use_milp: bool, time_limit_s: float,
         method: str) -> Plan:
    t0 = time.perf_counter()
    L = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if L.size == 0:
        raise PlanError("cannot plan an empty global batch (no sequences)")
    if (L <= 0).any():
        bad = np.flatnonzero(L <= 0)[:8].tolist()
        raise PlanError(f"lengths must be positive; sequences {bad} are not")
    check_feasible(L, cost, world_size)
    ctx = PlannerContext.build(cost, world_size)
    ctx.milp_shots = (0.015 * time_limit_s, 0.06 * time_limit_s)
    chunks, info = _plan_chunks(ctx, L, use_milp=use_milp, t0=t0, time_limit_s=max(0.05, float(time_limit_s)))
    plan = _to_plan(ctx, L, chunks)
    try:
        validate_plan(plan, cost)
    except PlanError:
        if info.get("cut") == "safe":
            raise
        order = np.argsort(-L, kind="stable")
        taus = seq_tau_table(L[order], cost, ctx.degrees)
        safe = _safe_plan(ctx, L[order], taus)
        plan = _to_plan(ctx, L, [(order[idx], sol) for idx, sol in safe])
        validate_plan(plan, cost)
        info["cut"] = "safe"
    plan.estimated_time_ms = estimate_plan_ms(plan, cost)
    statuses = info.get("milp_statuses", [])
    if not use_milp:
        status = "heuristic"
    elif statuses and all(s == "optimal" for s in statuses):
        status = "optimal"
    elif any(s in ("optimal", "time_limit") for s in statuses):
        status = "time_limit" if any(s == "time_limit" for s in statuses) else "optimal"
    else:
        status = "fallback_greedy"
    info.update(num_micro_batches=plan.num_micro_batches)
    plan.solver = SolverInfo(method=method, status=status, solve_time_s=time.perf_counter() - t0,
                             lower_bound_ms=lower_bound_ms(L, cost, world_size), extra=info)
    return plan


def greedy_plan(lengths: Sequence[int], cost: CostModel, world_size: int, *, time_limit_s: float = 30.0) -> Plan:
    """Fast heuristic plan (no MILP); always valid when any plan exists."""
    return _run(lengths, cost, world_size, use_milp=False, time_limit_s=time_limit_s, method="flexsp-greedy")


def plan_flexsp(lengths: Sequence[int], cost: CostModel, world_size: int, *, time_limit_s: float = 2.0,
                seed: int = 0) -> Plan:
    """FlexSP plan: greedy over candidate micro-batch cuts, then the MILP per micro-batch within the time limit.

    ``seed`` is accepted for API stability; the planner is deterministic.
    """
    del seed
    return _run(lengths, cost, world_size, use_milp=True, time_limit_s=time_limit_s, method="flexsp")
