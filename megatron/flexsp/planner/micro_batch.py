"""Solving ONE micro-batch: which SP groups (degrees) and which sequences each group runs.

Why a module of its own: the global-batch search (``global_batch.py``) evaluates thousands of
candidate micro-batches, so this is the planner's inner loop; everything here is about being
good *and* cheap on a handful to a few hundred sequences.

* Greedy (any world size): a sequence's preferred degree is the one of least GPU-ms (short
  ones: degree 1, no all-to-all). For a target time C each degree class needs
  n_d(C) = max(ceil(time/C), groups memory needs) groups; a bisection (on log C) finds the least
  C whose groups fit the ranks (a sequence too slow for C moves up a degree). Left-over ranks
  become more groups where the per-group load is highest. Sequences are dealt longest first
  onto the least loaded group of their class with memory room (LPT; memory-first best fit when
  that fragments memory), then a local search moves / swaps sequences out of the slowest group
  while that lowers it. Micro-batches with few sequences also try every homogeneous structure.
  Every structure is dealt; the local search runs on the two best dealt ones only, and not at
  all with ``quick=True``: the global search scores candidate cuts that way and searches only
  the cut it keeps (most of the old planner's time went into polishing structures and cuts that
  were then thrown away).
* Exact (small clusters, ``exact_micro_batch``): with at most ``EXACT_MAX_WORLD`` ranks the
  group structures (multisets of allowed degrees summing to the world size that ``placement``
  can put on aligned blocks) are few (4 on 4 ranks, 36 on 16 ranks of 8-GPU nodes), so each is
  tried by branch and bound over the sequence -> group assignment, best structure lower bound
  first, pruned by the incumbent, by memory, by the GPU-ms bound and by symmetric empty groups.
  It returns the optimum when it finishes before the deadline (``extra["exact_proven"]``).
* MILP (``milp.py``, any world size): bucketed lengths, short time-limited shots, its counts
  turned into sequences by the greedy's dealing + local search; kept only when better.

Every function takes an optional ``Deadline`` and returns the best it has when it passes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .bucketing import bucketize
from .costmodel import CostModel
from .deadline import Deadline
from .milp import ClassProblem, solve_class_milp
from .placement import can_place, place_groups
from .plan import PlanError

__all__ = [
    "PlannerContext",
    "MBSolution",
    "solve_micro_batch",
    "exact_micro_batch",
    "milp_shots",
    "EXACT_MAX_WORLD",
    "mb_lower_bound",
]

EXACT_MAX_WORLD = 16  # world sizes up to this get the exact per-micro-batch solver
EXACT_MAX_STRUCTURES = 400  # ... as long as the structures are this few

_EPS = 1e-9


@dataclass
class PlannerContext:
    """What every micro-batch solve needs, computed once per global batch."""

    cost: CostModel
    world_size: int
    degrees: list[int]
    caps: np.ndarray  # [D] tokens per group of each degree
    beta1: float
    milp_shots: tuple[float, ...] = (0.03, 0.12)  # MILP time limits tried per micro-batch
    _structures: list[tuple[int, ...]] | None = field(default=None, repr=False)
    _structures_done: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, cost: CostModel, world_size: int) -> PlannerContext:
        degs = cost.allowed_degrees(world_size)
        return cls(
            cost, world_size, degs, np.array([cost.capacity(d) for d in degs], dtype=np.float64), cost.compute.beta1_ms
        )

    def structures(self) -> list[tuple[int, ...]] | None:
        """Placeable group structures (degree indices, largest degree first), or None where too many to enumerate."""
        if not self._structures_done:
            self._structures_done = True
            if self.world_size <= EXACT_MAX_WORLD:
                self._structures = _enumerate_structures(self)
        return self._structures

    @property
    def exact(self) -> bool:
        """Whether micro-batches of this cluster are solved by the exact structure enumeration."""
        return self.structures() is not None


def _enumerate_structures(ctx: PlannerContext) -> list[tuple[int, ...]] | None:
    """All multisets of allowed degrees summing to the world size that aligned blocks can hold."""
    out: list[tuple[int, ...]] = []
    D = len(ctx.degrees)

    def rec(rest: int, kmax: int, cur: list[int]) -> bool:
        if rest == 0:
            degs = [ctx.degrees[k] for k in cur]
            if can_place(degs, ctx.cost, ctx.world_size):
                out.append(tuple(cur))
            return len(out) <= EXACT_MAX_STRUCTURES
        for k in range(kmax, -1, -1):
            if ctx.degrees[k] <= rest:
                cur.append(k)
                ok = rec(rest - ctx.degrees[k], k, cur)
                cur.pop()
                if not ok:
                    return False
        return True

    if not rec(ctx.world_size, D - 1, []):
        return None
    return out


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
                    if gr.tok[g] + Ll[s] <= cap[g] + _EPS:
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
        ok = (gr.tok + L[s] <= gr.cap + _EPS) & np.isfinite(fin)
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
        ok = (room >= -_EPS) & np.isfinite(gr.tau[s, gr.gk])
        if not ok.any():
            return False
        g = int(np.argmin(np.where(ok, room, np.inf)))
        gr.put(s, g)
    return True


def _rebalance(gr: _Groups, max_iter: int, deadline: Deadline | None = None) -> None:
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
        if it % 8 == 7 and deadline is not None and deadline.passed():
            return
        k0 = gr.gk[g0]
        best = (T0 - 1e-7, None, None)
        mem0 = gr.members[g0]
        if not mem0:
            return
        # all moves of g0's members at once: [member, group] (first best in member order, as a loop would)
        m0 = np.asarray(mem0, dtype=np.int64)
        rest = T0 - tau[m0, k0] if m0.size > 1 else np.zeros(m0.size)
        newg = gr.load[None, :] + tau[m0][:, gr.gk] + beta1
        ok = (gr.tok[None, :] + L[m0][:, None] <= gr.cap[None, :] + _EPS) & np.isfinite(newg)
        ok[:, g0] = False
        cand = np.where(ok, np.maximum(newg, rest[:, None]), np.inf)
        j = int(np.argmin(cand))
        if cand.flat[j] < best[0]:
            G = gr.gk.size
            best = (float(cand.flat[j]), ("move", int(m0[j // G]), j % G), None)
        if best[1] is None:
            others = np.flatnonzero((gr.where >= 0) & (gr.where != g0))
            if others.size:
                og = gr.where[others]
                ok_t = gr.gk[og]
                # g0 loses s, gains t; t's group loses t, gains s: [member s, other t]
                new0 = T0 - tau[m0, k0][:, None] + tau[others, k0][None, :]
                newo = (gr.load[og] + beta1 - tau[others, ok_t])[None, :] + tau[m0[:, None], ok_t[None, :]]
                mem_ok = (gr.tok[g0] - L[m0][:, None] + L[others][None, :] <= gr.cap[g0] + _EPS) & (
                    (gr.tok[og] - L[others])[None, :] + L[m0][:, None] <= gr.cap[og][None, :] + _EPS
                )
                cand = np.where(mem_ok & np.isfinite(new0) & np.isfinite(newo), np.maximum(new0, newo), np.inf)
                j = int(np.argmin(cand))
                if cand.flat[j] < best[0]:
                    n_o = others.size
                    best = (float(cand.flat[j]), ("swap", int(m0[j // n_o]), int(others[j % n_o])), None)
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


def _finish(
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
    return MBSolution(degs, [list(m) for m in gr.members], gr.makespan(), method)


def _small_k(L: np.ndarray, tau: np.ndarray) -> int:
    """Degree index of the smallest group the shortest sequence fits in."""
    return int(np.argmax(np.isfinite(tau[int(np.argmin(L))])))


def _fill_left_over(
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
        if hi - lo <= 2e-3 * hi:  # the local search absorbs what a finer target would change
            break
        mid = math.sqrt(lo * hi)
        r = structure(mid)
        if r is not None and r[4] <= ctx.world_size:
            hi = mid
        else:
            lo = mid
    cls, need, load, cnt, _ = structure(hi)
    return _fill_left_over(ctx, need, load, cnt, _small_k(L, tau)), cls


def _greedy(
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
        sol = _finish(ctx, L, tau, gk, cls, "greedy", 0, deadline)
        used = cls
        if sol is None and cls is not None:
            sol = _finish(ctx, L, tau, gk, None, "greedy", 0, deadline)
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
        sol = _finish(ctx, L, tau, gk, used, "greedy", iters, deadline)
        if sol is not None and sol.time_ms < best.time_ms - 1e-12:
            best = sol
    return best


def solve_micro_batch(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    *,
    use_milp: bool = False,
    time_limit_s: float = 0.5,
    upper: MBSolution | None = None,
    rebalance_iters: int | None = None,
    bucket_error: float = 0.02,
    max_buckets: int | None = 14,
    milp_span: int | None = 2,
    quick: bool = False,
    exact: bool | None = None,
    deadline: Deadline | None = None,
) -> MBSolution | None:
    """Best groups for one micro-batch (``L`` lengths, ``tau`` their tau table); None if the heuristics fail.

    ``exact`` (default: on small clusters) solves by structure enumeration + branch and bound;
    ``upper`` is a known solution to beat (then only the MILP runs); ``quick`` polishes only the
    greedy's best structure.
    """
    iters = rebalance_iters if rebalance_iters is not None else min(2 * L.size + 20, 400)
    best = upper
    if best is None and L.size:
        if exact is None:
            exact = ctx.exact
        if exact:
            best = exact_micro_batch(ctx, L, tau, deadline=deadline)
            if best is None or not best.extra.get("exact_proven"):  # stopped early: the greedy may do better
                alt = _greedy(ctx, L, tau, iters, True, deadline)
                if alt is not None and (best is None or alt.time_ms < best.time_ms - 1e-9):
                    best = alt
        else:
            best = _greedy(ctx, L, tau, iters, quick, deadline)
    if not use_milp or L.size == 0:
        return best
    # ---- MILP on buckets
    bk = bucketize(L, max_error=bucket_error, breaks=[int(c) for c in ctx.caps], max_buckets=max_buckets, max_atoms=400)
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
            cls[mem[pos : pos + c]] = k
            pos += c
    load = np.array([(np.where(sol.y[:, k] > 0, tmean[:, k], 0.0) * sol.y[:, k]).sum() for k in range(D)])
    cnt = sol.y.sum(axis=0)
    gk = _fill_left_over(ctx, sol.n.astype(np.int64), load, cnt, _small_k(L, tau))
    cand = _finish(ctx, L, tau, gk, cls, "milp", iters, deadline)
    if cand is not None:
        cand.extra.update(info)
        cand.extra["milp_bound_ms"] = sol.cprime + ctx.beta1
    if cand is not None and (best is None or cand.time_ms < best.time_ms - 1e-9):
        return cand
    if best is not None:
        best.extra.update(info)
    return best


def milp_shots(
    ctx: PlannerContext,
    L: np.ndarray,
    tau: np.ndarray,
    sol: MBSolution,
    deadline: Deadline,
    shots: Sequence[float] | None = None,
) -> MBSolution:
    """Improve a micro-batch with short MILP solves (the MILP's incumbents are concretised and kept when better).

    Short limits are enough: the aggregate model's optimum is not always the best concrete
    plan, so an early incumbent is as useful as a proven optimum; a second, longer shot runs
    only when the first was cut off. A shot starts only with 10 ms left (HiGHS needs a few
    to set up) and never runs past the deadline's remaining time.
    """
    best = sol
    statuses = []
    if shots is None:
        shots = ctx.milp_shots
    for tl in shots:
        left = deadline.left()
        if left < 0.01:
            statuses.append("skipped")
            break
        new = solve_micro_batch(ctx, L, tau, use_milp=True, time_limit_s=min(tl, left), upper=best, deadline=deadline)
        st = new.extra.get("milp_status", "none")
        statuses.append(st)
        if new.time_ms < best.time_ms - 1e-9:
            best = new
        if st != "time_limit":
            break
    best = MBSolution(best.degrees, best.members, best.time_ms, best.method, dict(best.extra))
    best.extra["milp_statuses"] = statuses
    return best


# ------------------------------------------------------------------------- exact (small clusters)


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
    beta1, ws = ctx.beta1, ctx.world_size
    # hardest sequences first: the incumbent is found, and the tree pruned, early (Python lists:
    # a micro-batch of a small cluster holds a handful of sequences, where numpy only adds overhead)
    rows = tau.tolist()
    order = sorted(range(n), key=lambda i: -min(rows[i]))
    rows = [rows[i] for i in order]
    bb = _BranchAndBound(
        ctx, [int(L[i]) for i in order], rows, upper.time_ms if upper is not None else math.inf, deadline, node_limit
    )
    best: tuple[tuple[int, ...], list[int]] | None = None
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
    nodes = bb.nodes
    best_t = bb.best_t
    if best is None:
        if upper is None:
            return None
        return MBSolution(
            list(upper.degrees),
            [list(m) for m in upper.members],
            upper.time_ms,
            upper.method,
            {**upper.extra, "exact_proven": not stopped},
        )
    st, asg = best
    members: list[list[int]] = [[] for _ in st]
    for i, g in enumerate(asg):
        members[g].append(order[i])
    return MBSolution(
        [ctx.degrees[k] for k in st],
        members,
        float(best_t),
        "exact",
        {"exact_proven": not stopped, "exact_nodes": nodes},
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
        row, li, load, tok, cnt, dg = self.t_l[i], self.L[i], self.load, self.tok, self.cnt, self.dg
        tried: set[int] = set()
        opts = []
        for g in range(len(row)):
            t = row[g]
            if t == math.inf or tok[g] + li > self.cap[g]:
                continue
            if cnt[g] == 0:
                if dg[g] in tried:  # empty groups of one degree are interchangeable
                    continue
                tried.add(dg[g])
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
