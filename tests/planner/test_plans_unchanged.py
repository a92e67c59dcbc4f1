"""The planner's plans are exactly those committed before it was cut by role (fixed work budget).

Why: the refactor of ``global_batch`` / ``micro_batch`` must change no decision. Each case of
``plan_refs`` runs under a budget of micro-batch solves (no clock), so its JSON, minus timing
fields, is compared bit for bit with ``data/plan_refs/<case>.json``.
"""

from __future__ import annotations

import pytest

from tests.planner import plan_refs

CASES = plan_refs.cases()


def test_every_reference_has_a_case() -> None:
    files = {p.stem for p in plan_refs.DATA.glob("*.json")}
    assert files == set(CASES), "reference files and cases differ"


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_unchanged(name: str) -> None:
    expected = (plan_refs.DATA / f"{name}.json").read_text()
    assert plan_refs.canonical(CASES[name]()) == expected
