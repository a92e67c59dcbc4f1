"""The per-micro-batch MILP on HiGHS (scipy.optimize.milp): group degrees and bucket assignment.

Formulation (aggregate over degree classes, so its size depends on the number of buckets B and
allowed degrees D, not on the number of sequences or ranks):

    variables  C' >= 0                      slowest group's time minus beta1 (continuous)
               n_d = sum_k 2^k z_{d,k}      groups of degree d, z binary (binary expansion)
               w_{d,k} in [0, U]            w_{d,k} = z_{d,k} * C'  (exact product linearisation,
                                            only the upper side is needed: w <= U z, w <= C')
               y_{b,d} in {0..cnt_b}        sequences of bucket b placed in class d (only if the
                                            bucket's longest length fits a degree-d group)
               u_{b,d} binary               bucket b used in class d
    minimise   C'
    subject to sum_d y_{b,d} = cnt_b                                  every sequence placed
               sum_b tmean_{b,d} y_{b,d} <= sum_k 2^k w_{d,k}         class time fits n_d groups
               sum_b lmean_b y_{b,d} <= cap_d n_d                     class tokens fit n_d groups
               y_{b,d} <= cnt_b u_{b,d},  tmax_{b,d} u_{b,d} <= C'    one sequence is not divisible
               sum_d d n_d <= world_size                              ranks
               n_d <= sum_b y_{b,d}                                   no empty group
               sum_{b: lmin_b > cap_d/2} y_{b,d} <= n_d               such sequences cannot share a group
               C' <= U                                                cut-off (the greedy plan's value)

tmean/tmax are the mean/largest time a bucket's sequence adds to a degree-d group
(work/d + all-to-all), lmean the mean length. The model relaxes each class's split into
concrete groups to its average; the planner then turns counts into sequences and rebalances
with exact lengths (flexsp.py), and keeps the greedy plan when that is not better.

Size: the planner buckets each micro-batch into at most 14 buckets (2 % padding error, bucket
edges at the group capacities) and lets a bucket use only its smallest feasible degree, the
next two and the largest, so a model has at most 56 integer counts and about 90 binaries, and
HiGHS answers in tens of milliseconds; it runs in short time-limited shots, and an incumbent
cut off by the limit is used like an optimum (the aggregate optimum is not always the best
concrete plan anyway). Exact buckets and all degrees make it a relaxation of the real
micro-batch problem (its value never exceeds the true optimum; tested against brute force).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

__all__ = ["ClassProblem", "ClassSolution", "solve_class_milp", "class_objective"]


@dataclass
class ClassProblem:
    counts: np.ndarray  # int [B] sequences per bucket
    tmean: np.ndarray  # [B, D] mean tau per sequence of the bucket at degree d (inf: not allowed)
    tmax: np.ndarray  # [B, D] largest tau in the bucket at degree d (inf: does not fit)
    lmean: np.ndarray  # [B] mean length
    degrees: Sequence[int]  # [D]
    caps: np.ndarray  # [D] tokens a group of each degree holds
    world_size: int
    lmin: np.ndarray | None = None  # [B] shortest length (sequences over half a group's capacity cannot share it)

    def big(self) -> np.ndarray:
        """[B, D]: every sequence of bucket b is longer than half a degree-d group's capacity."""
        if self.lmin is None:
            return np.zeros(self.tmax.shape, dtype=bool)
        return np.asarray(self.lmin)[:, None] > np.asarray(self.caps)[None, :] / 2.0


@dataclass
class ClassSolution:
    n: np.ndarray  # int [D] groups per degree
    y: np.ndarray  # int [B, D]
    cprime: float  # objective: slowest group time minus beta1 (aggregate model)
    status: str  # "optimal" | "time_limit" | "infeasible" | "error: ..."
    solve_time_s: float


def class_objective(p: ClassProblem, n: np.ndarray, y: np.ndarray) -> float:
    """C' of a given (n, y) under the aggregate model; inf if it breaks a constraint."""
    n = np.asarray(n)
    y = np.asarray(y)
    if (y.sum(axis=1) != p.counts).any() or int((np.asarray(p.degrees) * n).sum()) > p.world_size:
        return float("inf")
    best = 0.0
    for k in range(len(p.degrees)):
        used = y[:, k] > 0
        if n[k] == 0:
            if used.any():
                return float("inf")
            continue
        if y[:, k].sum() < n[k] or y[p.big()[:, k], k].sum() > n[k]:
            return float("inf")
        if used.any():
            if not np.isfinite(p.tmax[used, k]).all():
                return float("inf")
            if float((p.lmean * y[:, k]).sum()) > p.caps[k] * n[k] + 1e-6:
                return float("inf")
            load = float((p.tmean[used, k] * y[used, k]).sum()) / n[k]
            best = max(best, load, float(p.tmax[used, k].max()))
    return best


@dataclass
class _Layout:
    """Column of each variable: C (the objective), y/u per (bucket, class), binary digits z/w per (class, bit)."""

    iC: int = 0
    iy: dict[tuple[int, int], int] = field(default_factory=dict)
    iu: dict[tuple[int, int], int] = field(default_factory=dict)
    iz: dict[tuple[int, int], int] = field(default_factory=dict)
    iw: dict[tuple[int, int], int] = field(default_factory=dict)
    nvar: int = 1


def _layout(ok: np.ndarray, counts: np.ndarray, degs: list[int], ws: int) -> _Layout:
    B, D = ok.shape
    lay = _Layout()
    col = 1
    for b in range(B):
        for k in range(D):
            if ok[b, k] and counts[b] > 0:
                lay.iy[b, k] = col
                lay.iu[b, k] = col + 1
                col += 2
    for k, d in enumerate(degs):
        nmax = min(ws // d, int(sum(counts[b] for b in range(B) if (b, k) in lay.iy)))
        bits = 0
        while (1 << bits) - 1 < nmax:
            bits += 1
        for j in range(bits):
            lay.iz[k, j] = col
            lay.iw[k, j] = col + 1
            col += 2
    lay.nvar = col
    return lay


def _variable_bounds(lay: _Layout, counts: np.ndarray, U: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, integrality) per column."""
    lb = np.zeros(lay.nvar)
    ub = np.zeros(lay.nvar)
    integ = np.zeros(lay.nvar)
    ub[lay.iC] = U
    for (b, k), c in lay.iy.items():
        ub[c] = counts[b]
        integ[c] = 1
        ub[lay.iu[b, k]] = 1
        integ[lay.iu[b, k]] = 1
    for key, c in lay.iz.items():
        ub[c] = 1
        integ[c] = 1
        ub[lay.iw[key]] = U
    return lb, ub, integ


class _Rows:
    """Sparse constraint rows low <= a.x <= high, added in order."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, entries, low: float, high: float) -> None:
        r = len(self.lo)
        for c, v in entries:
            self.rows.append(r)
            self.cols.append(c)
            self.vals.append(v)
        self.lo.append(low)
        self.hi.append(high)

    def constraint(self, nvar: int) -> LinearConstraint:
        A = coo_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.lo), nvar)).tocsr()
        return LinearConstraint(A, self.lo, self.hi)


def _class_rows(R: _Rows, p: ClassProblem, lay: _Layout, k: int, big: np.ndarray, U: float) -> None:
    """Time, memory, no-empty-group, big-sequence and linearisation rows of degree class k."""
    B = p.tmax.shape[0]
    iz, iw = lay.iz, lay.iw
    zs = [(j, iz[k, j]) for (kk, j) in iz if kk == k]
    ys = [(b, lay.iy[b, k]) for b in range(B) if (b, k) in lay.iy]
    # time: sum tmean y - sum 2^j w <= 0
    R.add([(c, float(p.tmean[b, k])) for b, c in ys] + [(iw[k, j], -float(1 << j)) for j, _ in zs], -np.inf, 0.0)
    # memory: sum lmean y - cap sum 2^j z <= 0
    R.add([(c, float(p.lmean[b])) for b, c in ys] + [(cz, -float(p.caps[k]) * (1 << j)) for j, cz in zs], -np.inf, 0.0)
    # no empty group: sum 2^j z - sum y <= 0
    R.add([(cz, float(1 << j)) for j, cz in zs] + [(c, -1.0) for _, c in ys], -np.inf, 0.0)
    # sequences over half the capacity need a group each: sum_{big b} y - n <= 0
    bigs = [(b, c) for b, c in ys if big[b, k]]
    if bigs:
        R.add([(c, 1.0) for _, c in bigs] + [(cz, -float(1 << j)) for j, cz in zs], -np.inf, 0.0)
    for j, cz in zs:
        R.add([(iw[k, j], 1.0), (cz, -U)], -np.inf, 0.0)
        R.add([(iw[k, j], 1.0), (lay.iC, -1.0)], -np.inf, 0.0)


def _rows(p: ClassProblem, lay: _Layout, counts: np.ndarray, degs: list[int], U: float) -> _Rows | None:
    """Every constraint row, in a fixed order; None when a bucket has sequences but no feasible class."""
    B, D = p.tmax.shape
    big = p.big()
    R = _Rows()
    for b in range(B):
        ent = [(lay.iy[b, k], 1.0) for k in range(D) if (b, k) in lay.iy]
        if counts[b] > 0:
            if not ent:
                return None
            R.add(ent, counts[b], counts[b])
    for k in range(len(degs)):
        _class_rows(R, p, lay, k, big, U)
    for (b, k), c in lay.iy.items():
        R.add([(c, 1.0), (lay.iu[b, k], -float(counts[b]))], -np.inf, 0.0)
        R.add([(lay.iu[b, k], float(p.tmax[b, k])), (lay.iC, -1.0)], -np.inf, 0.0)
    R.add([(lay.iz[k, j], float(degs[k] * (1 << j))) for (k, j) in lay.iz], -np.inf, float(p.world_size))
    return R


def _decode(x: np.ndarray, lay: _Layout, B: int, D: int) -> tuple[np.ndarray, np.ndarray]:
    """(groups per class, sequences per bucket and class) of a MILP solution."""
    y = np.zeros((B, D), dtype=np.int64)
    for (b, k), c in lay.iy.items():
        y[b, k] = int(round(x[c]))
    n = np.zeros(D, dtype=np.int64)
    for (k, j), c in lay.iz.items():
        n[k] += int(round(x[c])) << j
    return n, y


def _upper_bound(p: ClassProblem, counts: np.ndarray, ok: np.ndarray, upper: float | None) -> float:
    """The objective's upper bound: the caller's incumbent, else everything in one group."""
    U = (
        float(upper)
        if upper is not None and np.isfinite(upper)
        else float(np.where(ok, p.tmax, 0).max() + (np.where(ok, p.tmean, 0) * counts[:, None]).sum())
    )
    return max(U, 1e-9)


def solve_class_milp(
    p: ClassProblem, *, upper: float | None = None, time_limit_s: float = 1.0, mip_rel_gap: float = 1e-4
) -> ClassSolution:
    t0 = time.perf_counter()
    B, D = p.tmax.shape
    degs = [int(d) for d in p.degrees]
    counts = np.asarray(p.counts, dtype=np.int64)
    ok = np.isfinite(p.tmax)
    U = _upper_bound(p, counts, ok, upper)
    lay = _layout(ok, counts, degs, p.world_size)
    lb, ub, integ = _variable_bounds(lay, counts, U)

    def failed(status: str) -> ClassSolution:
        return ClassSolution(np.zeros(D, int), np.zeros((B, D), int), float("inf"), status, time.perf_counter() - t0)

    R = _rows(p, lay, counts, degs, U)
    if R is None:
        return failed("infeasible")
    cvec = np.zeros(lay.nvar)
    cvec[lay.iC] = 1.0
    try:
        res = milp(
            cvec,
            integrality=integ,
            bounds=Bounds(lb, ub),
            constraints=R.constraint(lay.nvar),
            options={"time_limit": max(0.01, float(time_limit_s)), "disp": False, "mip_rel_gap": mip_rel_gap},
        )
    except Exception as e:  # noqa: BLE001 - HiGHS failures fall back to the greedy plan
        return failed(f"error: {e}")
    dt = time.perf_counter() - t0
    if res.x is None:
        status = "infeasible" if res.status == 2 else ("time_limit" if res.status == 1 else f"error: {res.message}")
        return ClassSolution(np.zeros(D, int), np.zeros((B, D), int), float("inf"), status, dt)
    n, y = _decode(res.x, lay, B, D)
    status = "optimal" if res.status == 0 else "time_limit"
    return ClassSolution(n, y, float(res.x[lay.iC]), status, dt)
