"""The phase table: which improvement moves run, in which order, and when.

Why a table: the order is the planner's judgement of value per millisecond, and it is read and
changed here, apart from how each move works (``fill``, ``polish``, ``moves``, ``pairs``) and
from the driver that runs them (``driver``). Each phase runs only while the search is not done
(deadline or gap) and its ``when`` holds; its count of accepted changes adds up under ``key``
in the solver's ``extra``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..micro_batch import Chunk
from .common import Move, Search
from .fill import fill_pass
from .moves import move_search
from .pairs import pair_search
from .polish import polish

__all__ = ["Phase", "PHASES", "MOVES_MAX_PER_MB"]

# single moves / swaps between micro-batches re-solve both for every candidate; beyond this many
# sequences per micro-batch (on average) a solve costs 100+ ms and moves almost never pay (measured:
# 0 accepted in 2 s on 1024 GPUs x 8192 sequences), so the time goes to the MILP and other cuts
MOVES_MAX_PER_MB = 512

When = Callable[[Search, list[Chunk], dict], bool]


@dataclass(frozen=True)
class Phase:
    """One improvement phase: its name in ``extra["phases"]``, its counter, its move and its condition."""

    name: str
    key: str
    move: Move
    when: When


def _always(s: Search, mbs: list[Chunk], info: dict) -> bool:
    return True


def _few_per_micro_batch(s: Search, mbs: list[Chunk], info: dict) -> bool:
    return s.Ls.size <= MOVES_MAX_PER_MB * len(mbs)


def _after_pair_changes(s: Search, mbs: list[Chunk], info: dict) -> bool:
    """Pairs changed the micro-batches: single moves may pay again."""
    return bool(info.get("pair_changes"))


PHASES: tuple[Phase, ...] = (
    # a micro-batch set by a few long sequences lends its idle room to faster ones
    Phase("fill", "fill_pulls", fill_pass, _always),
    # the head of the batch: which long sequences share a micro-batch
    Phase("polish", "polish_moves", polish, _always),
    # any sequence anywhere (small clusters gain most here)
    Phase("moves", "moves", move_search, _few_per_micro_batch),
    # two micro-batches merged or cut anew, then moves again
    Phase("pairs", "pair_changes", pair_search, _few_per_micro_batch),
    Phase("moves2", "moves", move_search, _after_pair_changes),
)
