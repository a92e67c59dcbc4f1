"""One ``flexsp-convert`` subcommand as a table entry, in a module of its own.

Why separate from cli.py: modules that contribute commands (hf, mcore) build their entries with
this type, and cli.py imports them to fill its table; if they imported cli.py for the type, the
two would import each other (tests/test_architecture.py forbids import cycles).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Command"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments, and what it runs (returns the exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
