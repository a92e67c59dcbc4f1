"""The planner stays in small modules of short functions (issue 15 targets).

Why: the planner is read by people who did not write it; a module over ~400 lines mixes roles
and a function over 60 lines hides its steps. Measured with ``ast`` (a function's lines run
from its ``def`` to its last line, decorators excluded, docstring included).
"""

from __future__ import annotations

import ast
from pathlib import Path

PLANNER = Path(__file__).resolve().parents[2] / "megatron" / "flexsp" / "planner"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _files() -> list[Path]:
    return sorted(PLANNER.rglob("*.py"))


def _visit(node: ast.AST, prefix: str, out: list[tuple[int, str]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                out.append((child.end_lineno - child.lineno + 1, name))
            _visit(child, name + ".", out)


def function_lengths() -> list[tuple[int, str]]:
    """(lines, 'file:qualified name') of every function and method in planner/."""
    out = []
    for f in _files():
        tree = ast.parse(f.read_text())

        _visit(tree, f"{f.relative_to(PLANNER)}:", out)
    return sorted(out, reverse=True)


def test_no_planner_file_over_limit() -> None:
    sizes = {str(f.relative_to(PLANNER)): len(f.read_text().splitlines()) for f in _files()}
    over = {k: v for k, v in sizes.items() if v > MAX_FILE_LINES}
    assert not over, f"planner files over {MAX_FILE_LINES} lines: {over}"


def test_no_planner_function_over_limit() -> None:
    over = [(n, name) for n, name in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not over, f"planner functions over {MAX_FUNCTION_LINES} lines: {over}"


if __name__ == "__main__":
    for n, name in function_lengths()[:15]:
        print(n, name)
