"""Reference plans of the planner under a fixed work budget, to prove a refactor changes no plan.

Why: the planner's search is anytime; under the clock its plans depend on the CPU it got. With
``work_limit`` (a budget of micro-batch solves, ``deadline.Deadline``) no decision reads the
clock, so the same batch always gets the same plan. The cases below run the public API
(``api.plan_global_batch``, ``api.fallback_plan``), the global-batch entry points and the three
micro-batch solvers on fixed batches; ``test_plans_unchanged`` regenerates them and compares
with the JSON committed under ``data/`` before the planner was cut by role.

Timing fields (keys ending in ``_s``: ``solve_time_s``, ``constructive_s``, ``phase_s``,
``milp_time_s``) are dropped: they are measurements, not decisions.

    .venv/bin/python -m tests.planner.plan_refs     # rewrite the references (only before a refactor)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from megatron.flexsp.data.synthetic import longtail_lengths
from megatron.flexsp.planner import api
from megatron.flexsp.planner.bounds import seq_tau_table
from megatron.flexsp.planner.costmodel import CostModel
from megatron.flexsp.planner.flexsp import greedy_plan, plan_flexsp
from megatron.flexsp.planner.micro_batch import (
    PlannerContext,
    exact_micro_batch,
    solve_micro_batch,
)
from megatron.flexsp.planner.presets import preset

DATA = Path(__file__).with_name("data") / "plan_refs"

# A "real" batch: document lengths of a few hundred web pages, code files and papers (rounded
# token counts as a tokenizer reports them; typed in, so it never changes).
REAL_LENGTHS = [
    412,
    1890,
    733,
    96,
    15420,
    2210,
    388,
    640,
    5120,
    127,
    901,
    3300,
    45,
    7810,
    260,
    1175,
    530,
    18900,
    2048,
    610,
    77,
    1430,
    9120,
    350,
    2890,
    480,
    66,
    12300,
    990,
    1720,
    205,
    4410,
    830,
    150,
    2600,
    31000,
    720,
    1310,
    58,
    6240,
    440,
    1960,
    300,
    870,
    24500,
    1080,
]


def _drop_timings(x: Any) -> Any:
    """The plan without clock readings (keys ending in ``_s``)."""
    if isinstance(x, dict):
        return {k: _drop_timings(v) for k, v in x.items() if not k.endswith("_s")}
    if isinstance(x, list):
        return [_drop_timings(v) for v in x]
    return x


def _batch(n: int, max_len: int, seed: int, **kw: Any) -> list[int]:
    return longtail_lengths(n, max_len=max_len, seed=seed, **kw).tolist()


def _api_case(
    model: str, ws: int, lengths: list[int], method: str, work: int, gap: float = 0.01, fallback: bool = False
) -> Callable[[], dict]:
    def run() -> dict:
        cost = preset(model, ws)
        cfg = api.PlannerConfig(
            world_size=ws, method=method, work_limit=work, gap=gap, max_seq_len=max(lengths), time_limit_s=2.0
        )
        plan = (api.fallback_plan if fallback else api.plan_global_batch)(lengths, cost, cfg)
        return plan.to_dict()

    return run


def _entry_case(model: str, ws: int, lengths: list[int], greedy: bool, work: int, gap: float) -> Callable[[], dict]:
    def run() -> dict:
        cost = preset(model, ws)
        fn = greedy_plan if greedy else plan_flexsp
        return fn(lengths, cost, ws, gap=gap, work_limit=work).to_dict()

    return run


def _mb_context(cost: CostModel, ws: int, lengths: list[int]) -> tuple[PlannerContext, np.ndarray, np.ndarray]:
    ctx = PlannerContext.build(cost, ws)
    L = np.sort(np.asarray(lengths, dtype=np.int64))[::-1].copy()
    return ctx, L, seq_tau_table(L, cost, ctx.degrees)


def _mb_dict(sol: Any) -> dict | None:
    if sol is None:
        return None
    return {
        "degrees": list(sol.degrees),
        "members": [list(m) for m in sol.members],
        "time_ms": sol.time_ms,
        "method": sol.method,
        "extra": sol.extra,
    }


def _mb_case(model: str, ws: int, lengths: list[int], solver: str) -> Callable[[], dict]:
    def run() -> dict:
        cost = preset(model, ws)
        ctx, L, tau = _mb_context(cost, ws, lengths)
        if solver == "exact":
            sol = exact_micro_batch(ctx, L, tau, node_limit=20_000)
        elif solver == "milp":  # small enough that HiGHS proves optimality far inside the limit
            sol = solve_micro_batch(ctx, L, tau, use_milp=True, time_limit_s=60.0, exact=False)
        else:
            sol = solve_micro_batch(ctx, L, tau, quick=solver == "quick", exact=False)
        return {"lengths": [int(x) for x in L], "solution": _mb_dict(sol)}

    return run


def cases() -> dict[str, Callable[[], dict]]:
    """Name -> function producing the JSON-able result of one fixed case."""
    tiny = _batch(32, 2048, seed=1, median=400.0, tail_min=1024.0)
    mid = _batch(96, 65536, seed=2)
    big = _batch(512, 196608, seed=3)
    real = list(REAL_LENGTHS)
    many = _batch(128, 30000, seed=0, median=6000.0)
    pairs = _batch(40, 2048, seed=6, median=700.0)
    out: dict[str, Callable[[], dict]] = {}
    for m in api.METHODS:
        out[f"api_{m}_cputiny_ws4"] = _api_case("cpu-tiny-ddp", 4, tiny, m, work=120)
        out[f"api_{m}_gpt7b_ws64"] = _api_case("gpt-7b", 64, big, m, work=60)
    out["api_flexsp_cputiny_ws4_gap0"] = _api_case("cpu-tiny", 4, tiny, "flexsp", work=300, gap=0.0)
    out["api_flexsp_gpt7b_ws16_real"] = _api_case("gpt-7b", 16, real, "flexsp", work=15, gap=0.0)
    out["api_flexsp_gpt13b_ws16"] = _api_case("gpt-13b", 16, mid[:48], "flexsp", work=20, gap=0.0)
    out["api_flexsp_gpt30b_ws32"] = _api_case("gpt-30b", 32, mid, "flexsp", work=250, gap=0.0)
    out["api_fallback_gpt7b_ws64"] = _api_case("gpt-7b", 64, big, "flexsp", work=50, fallback=True)
    out["greedy_gpt7b_ws8_real"] = _entry_case("gpt-7b", 8, real[:24], greedy=True, work=30, gap=0.0)
    out["greedy_gpt7b_ws32"] = _entry_case("gpt-7b", 32, many, greedy=True, work=300, gap=0.0)
    out["flexsp_gpt13b_ws32_real"] = _entry_case("gpt-13b", 32, real, greedy=False, work=300, gap=0.0)
    # reaches every improvement phase, including pair changes and the second move search
    out["flexsp_cputinyddp_ws4_pairs"] = _entry_case("cpu-tiny-ddp", 4, pairs, greedy=False, work=300, gap=0.0)
    head = sorted(big, reverse=True)[1:11] + big[200:236]  # fits one micro-batch of 64 ranks
    for solver in ("quick", "full", "milp"):
        out[f"mb_{solver}_gpt7b_ws64"] = _mb_case("gpt-7b", 64, head, solver)
    out["mb_exact_gpt7b_ws16"] = _mb_case("gpt-7b", 16, real[:14], "exact")
    out["mb_full_cputiny_ws4"] = _mb_case("cpu-tiny", 4, [x for x in tiny if x <= 500][:6], "full")
    return out


def canonical(result: dict) -> str:
    """The JSON text compared bit for bit (floats as ``repr``: exact round trip)."""
    return json.dumps(_drop_timings(result), sort_keys=True, indent=1) + "\n"


def write_all() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, run in cases().items():
        (DATA / f"{name}.json").write_text(canonical(run()))


if __name__ == "__main__":
    write_all()
