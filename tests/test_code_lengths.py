"""benchmarks/code_lengths.py: byte lengths of source files, in path order, empty and other files left out."""

import importlib.util
from pathlib import Path

import numpy as np

from megatron.flexsp.planner.lengths_io import read_lengths

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("code_lengths", ROOT / "benchmarks" / "code_lengths.py")
cl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cl)


def test_lengths_in_path_order_without_empty_or_binary_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("x" * 7)
    (tmp_path / "b" / "a.h").write_text("y" * 3)
    (tmp_path / "a.md").write_text("z" * 11)
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "lib.so").write_bytes(b"\0" * 99)
    assert cl.file_lengths(str(tmp_path)) == [11, 3, 7]  # a.md, b/a.h, b/z.py


def test_committed_lengths_are_a_long_tail_that_flexsp_plan_reads():
    lengths = read_lengths(str(cl.OUT))
    assert lengths.size > 10_000 and lengths.min() >= 1
    assert np.median(lengths) < 4096 < 196608 < lengths.max()  # short body, tail past 192K
