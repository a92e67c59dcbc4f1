"""The constructive phase: candidate cuts of the sorted batch into micro-batches, and the seeds.

Why consecutive cuts: sorting the sequences longest first and cutting them into consecutive
chunks (``blaster``: a DP over cut points on estimated micro-batch times under memory budgets of
92/86/96/100 %, and the paper's min-max token cut for M = M_min .. M_min+2; generated lazily,
best-on-average first) gives a complete plan in milliseconds. Each cut is scored by solving its
micro-batches quickly; a chunk that cannot be packed is split in two, not dropped. Plans given
as seeds (the api passes the baselines' plans) compete as well, so the solver's own plan never
loses to a baseline rule. ``safe_plan`` is the last resort that is always valid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..blaster import ChunkEstimator, cut_points, min_max_chunks, segment_matrix
from ..bounds import min_micro_batches
from ..costmodel import CostModel
from ..micro_batch import Chunk, MBSolution, PlannerContext
from ..plan import Plan
from .common import Search, total

__all__ = ["safe_plan", "candidate_splits", "seed_chunks", "constructive", "Candidate"]

CONSTRUCT_SHARE = 0.4  # at most this share of the budget builds cuts (always at least one complete plan)
MAX_REPAIR_DEPTH = 12  # an unsolvable chunk is halved at most this deep

Candidate = tuple[float, str, list[Chunk]]  # (estimated ms, name, micro-batches)


def safe_plan(ctx: PlannerContext, L: np.ndarray, tau: np.ndarray) -> list[Chunk]:
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
        opts = [int(kmin[s]) for s in seqs] + [0] * (ctx.world_size - used[m])  # option 0: degree 1
        members = [[j] for j in range(len(seqs))] + [[] for _ in range(ctx.world_size - used[m])]
        idx = np.asarray(seqs, dtype=np.int64)
        t = max(ctx.beta1 + tau[s, kmin[s]] for s in seqs)
        out.append(Chunk(idx, MBSolution(degs, members, float(t), "safe", options=opts)))
    return out


def _cut_models(ctx: PlannerContext, taus: np.ndarray) -> list[tuple[str, CostModel, np.ndarray, list[int]]]:
    """(name prefix, model, tau columns, degrees) per recompute mode the cuts are sized for: one mode, the
    context's own; several, each mode's (its memory budget and speed): the envelope of the modes would
    pack micro-batches with the leanest mode's memory at the fastest mode's speed, which no group has."""
    if len(ctx.modes) == 1:
        return [("", ctx.cost, taus, ctx.degrees)]
    out = []
    for m in ctx.modes:
        ks = [k for k, mk in enumerate(ctx.option_modes) if mk == m]
        if np.isfinite(taus[:, ks]).any(axis=1).all():  # a mode that cannot hold every sequence sizes no cut
            out.append((m + ":", ctx.base.for_mode(m), taus[:, ks], [ctx.degrees[k] for k in ks]))
    return out or [("", ctx.cost, taus, ctx.degrees)]


def candidate_splits(ctx: PlannerContext, Ls: np.ndarray, taus: np.ndarray) -> Iterator[tuple[str, list[np.ndarray]]]:
    """Candidate splits of the sorted batch (positions 0..n-1) into micro-batches, most promising first.

    Consecutive cuts of the sorted batch (``blaster``), generated lazily so that a tight
    deadline pays only for the first. (Dealing the longest sequences one per micro-batch among
    short ones was tried and lost on long-tail batches: memory then forces the long sequence
    into a group too small to keep pace with the rest.) With several recompute modes, each kind
    of cut comes once per mode (``_cut_models``).
    """
    n = Ls.size
    seen: set[tuple[int, ...]] = set()
    pts = cut_points(Ls)
    models = []
    for prefix, cost, tm, degs in _cut_models(ctx, taus):
        est, tok = ChunkEstimator(Ls, cost, ctx.world_size, tm, degs).matrix(pts)
        budget = float(cost.tokens_per_gpu * ctx.world_size)
        models.append((prefix, est, tok, budget, min_micro_batches(Ls, cost, ctx.world_size)))

    def new(name: str, b: list[int]):
        if b and tuple(b) not in seen:
            seen.add(tuple(b))
            return name, [np.arange(x, y) for x, y in zip(b[:-1], b[1:])]
        return None

    def dp(frac: float, prefix, est, tok, budget, mmin):
        return new(f"{prefix}dp{frac:g}", segment_matrix(pts, np.where(tok <= frac * budget + 1e-9, est, np.inf))[0])

    def minmax(m: int, prefix, est, tok, budget, mmin):
        return new(f"{prefix}minmax{m}", min_max_chunks(Ls, m)[0]) if m <= n else None

    # order: measured on long-tail batches (64 GPUs, gpt-7b), the 92 % memory budget is best on
    # average and within 4 % of the best cut in every batch; the full budget packs micro-batches
    # so tightly that the greedy sometimes cannot, min-max cuts ignore time altogether
    # several modes: the fastest mode's cuts first (a tight deadline then sees what that mode alone would),
    # the other modes' interleaved, kind by kind
    kinds = ((dp, 0.92), (dp, 0.86), (dp, 0.96), (dp, 1.0), (minmax, 0), (minmax, 1), (minmax, 2))
    first = [models[0]] if models[0][0] in ("", ctx.modes[0] + ":") else []
    for group in [first, models[len(first) :]] if first else [models]:
        for make, arg in kinds:
            for md in group:
                c = make(arg, *md) if make is dp else make(md[4] + arg, *md)
                if c is not None:
                    yield c


def seed_chunks(ctx: PlannerContext, seed: Plan, pos: np.ndarray, taus: np.ndarray) -> list[Chunk] | None:
    """A plan (e.g. a baseline's) as micro-batches of the sorted batch; None when it uses a degree (or
    recompute mode) the search does not."""
    out = []
    for mb in seed.micro_batches:
        idx, members, degs, opts = [], [], [], []
        for g in mb.groups:
            k = ctx.option_of(g.degree, g.recompute)
            if k is None:
                return None
            degs.append(g.degree)
            opts.append(k)
            members.append(list(range(len(idx), len(idx) + len(g.sequences))))
            idx += [int(pos[s]) for s in g.sequences]
        if not idx:
            continue
        t = max(ctx.beta1 + float(taus[[idx[j] for j in m], k].sum()) for m, k in zip(members, opts) if m)
        out.append(Chunk(np.asarray(idx, dtype=np.int64), MBSolution(degs, members, t, "seed", options=opts)))
    return out


def _repaired(s: Search, idx: np.ndarray, depth: int = 0) -> list[np.ndarray] | None:
    """``idx`` if it can be solved, else its two halves (by tokens), recursively."""
    if s.solve(idx) is not None:
        return [idx]
    if idx.size < 2 or depth > MAX_REPAIR_DEPTH:
        return None
    b, _ = min_max_chunks(s.Ls[idx], 2)
    left = _repaired(s, idx[: b[1]], depth + 1)
    right = _repaired(s, idx[b[1] :], depth + 1) if left is not None else None
    return None if right is None else left + right


def _scored_cuts(s: Search) -> list[tuple[float, str, list[np.ndarray]]]:
    """The cuts that could be solved, each with its quick estimate, within the constructive share."""
    construct = s.deadline.share(CONSTRUCT_SHARE)
    scored: list[tuple[float, str, list[np.ndarray]]] = []
    for name, parts in candidate_splits(s.ctx, s.Ls, s.taus):
        if scored and construct.passed():
            break
        fixed: list[np.ndarray] = []
        for idx in parts:
            r = _repaired(s, idx)
            if r is None:
                fixed = []
                break
            fixed += r
        if fixed:
            scored.append((sum(s.solve(i).time_ms for i in fixed), name, fixed))
    return scored


def constructive(s: Search, pos: np.ndarray, seeds: Sequence[tuple[str, Plan]], info: dict) -> list[Candidate]:
    """Every candidate plan: the solved cuts, then the seeds (unsorted; empty when nothing could be solved)."""
    scored = _scored_cuts(s)
    info["cuts_tried"] = len(scored)
    cands: list[Candidate] = [(t, name, [Chunk(i, s.solve(i)) for i in parts]) for t, name, parts in scored]
    for name, plan in seeds:
        sc = seed_chunks(s.ctx, plan, pos, s.taus)
        if sc:
            for idx, sol in sc:
                s.solve.put(idx, sol)
            cands.append((total(sc), "seed:" + name, sc))
    return cands
