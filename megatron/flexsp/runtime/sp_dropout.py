"""Attention dropout drawn from a per-rank RNG state, so the ranks of an SP group draw different masks.

Why: every rank is seeded alike, and after the all-to-all each rank of an SP group holds other
heads of the same tokens. Drawing dropout from the shared default generator gave head ``h`` of
rank 0 and head ``h`` of rank 1 the same mask (the heads' masks were correlated, not
independent). Megatron's parallel ranks draw from tracker states with per-rank seed offsets;
this is the same idea: one named state in megatron's RNG tracker, seeded ``seed + offset + rank``.
The state lives in the tracker, so checkpoints save and restore it with the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["SP_DROPOUT_RNG", "add_sp_dropout_state", "sp_dropout_rng", "sp_dropout_tracker"]

SP_DROPOUT_RNG = "flexsp-sp-dropout-rng"
# Far above megatron's own seed offsets (+1024 expert, +2718 tensor-parallel): no seed collides.
_SEED_OFFSET = 1 << 20


def _tracker() -> Any:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def add_sp_dropout_state(seed: int, rank: int) -> None:
    """Add this rank's dropout state to megatron's (already seeded) tracker; replaces an older one."""
    tracker = _tracker()
    states = tracker.get_states()
    if SP_DROPOUT_RNG in states:  # re-seeding: drop the old state (and its seed) first
        states = {k: v for k, v in states.items() if k != SP_DROPOUT_RNG}
        tracker.set_states(states)
        tracker.seeds_.discard(getattr(tracker, "_flexsp_sp_seed", None))
    tracker.add(SP_DROPOUT_RNG, seed + _SEED_OFFSET + rank)
    tracker._flexsp_sp_seed = seed + _SEED_OFFSET + rank


@contextlib.contextmanager
def sp_dropout_rng(active: bool = True) -> Iterator[None]:
    """Run the block on this rank's dropout state (no-op when inactive or the state was never added)."""
    if not active:
        yield
        return
    try:
        tracker = _tracker()
        has = SP_DROPOUT_RNG in tracker.get_states()
    except Exception:  # noqa: BLE001 - megatron's tracker unavailable: the default generator serves
        has = False
    if not has:
        yield
        return
    with tracker.fork(SP_DROPOUT_RNG):
        yield


class _SPDropoutTracker:
    """Megatron's tracker whose ``fork()`` defaults to the SP dropout state (for TE's attention)."""

    def __init__(self, tracker: Any) -> None:
        self._tracker = tracker

    def fork(self, name: str | None = None) -> Any:
        if name is None and SP_DROPOUT_RNG in self._tracker.get_states():
            name = SP_DROPOUT_RNG
        return self._tracker.fork(name) if name is not None else self._tracker.fork()

    def __getattr__(self, item: str) -> Any:
        return getattr(self._tracker, item)


def sp_dropout_tracker() -> _SPDropoutTracker:
    """``get_rng_state_tracker`` for Transformer Engine's DotProductAttention: forks this rank's state."""
    return _SPDropoutTracker(_tracker())
