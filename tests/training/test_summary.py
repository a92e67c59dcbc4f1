"""Run summaries and the comparison table, checked against hand-computed numbers."""

from __future__ import annotations

import json

import pytest

from megatron.flexsp.training.logging_utils import IterationRecord
from megatron.flexsp.training.summary import compare_table, main, read_metrics, summarize


def _rec(it, tokens, ms, loss, mode, mb=2, a2a=0.0):
    """A metrics row as the trainer writes it."""
    return IterationRecord(it, loss, 1e-3, 1.0, tokens, ms, ms / 2, mb, mode, {1: 4, 4: 1}, a2a).to_json()


def test_summary_skips_warmup_and_weights_by_time():
    recs = [_rec(1, 1000, 5000, 9.0, "flexsp")] + [
        _rec(i, 1000 * i, 100 * i + 100, 5.0 - i * 0.1, "flexsp", a2a=10.0) for i in range(2, 5)
    ]
    s = summarize(recs, "x")
    # iteration 1 (the slow warm-up) is left out: tokens 9000 over 1200 ms
    assert s.measured_iterations == 3
    assert s.tokens_per_s == pytest.approx(9000 / 1.2)
    assert s.iter_ms == pytest.approx(400.0)
    assert s.a2a_share == pytest.approx(30 / 1200)
    assert (s.first_loss, s.final_loss) == (9.0, pytest.approx(4.6))
    assert s.groups_by_degree == {"1": 16, "4": 4}


def test_compare_table_speedup_over_static(tmp_path, capsys):
    a, b = tmp_path / "static.jsonl", tmp_path / "flexsp.jsonl"
    a.write_text("".join(json.dumps(_rec(i, 1000, 200, 4.0, "static")) + "\n" for i in range(1, 6)))
    b.write_text(
        "".join(json.dumps(_rec(i, 1000, 125, 4.0, "flexsp")) + "\n" for i in range(1, 6))
        + json.dumps({"iteration": 5, "valid_loss": 3.0})
        + "\n"
    )
    assert len(read_metrics(b)) == 5  # the validation line is not a training record
    table = compare_table([summarize(read_metrics(a), "static"), summarize(read_metrics(b), "flexsp")])
    assert "1.60x" in table and "1.00x" in table
    assert main(["compare", f"s={a}", f"f={b}"]) == 0
    out = capsys.readouterr().out
    assert "1.60x" in out and "5,000.0" in out and "8,000.0" in out
    assert main(["compare", str(tmp_path / "missing.jsonl")]) == 2
    assert "metrics file not found" in capsys.readouterr().err
