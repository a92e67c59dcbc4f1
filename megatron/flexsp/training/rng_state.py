"""Every random generator a resumed run must continue: Python, numpy, torch (CPU and CUDA) and
megatron's model-parallel RNG tracker.

Why the tracker too: megatron draws dropout masks inside ``get_cuda_rng_tracker().fork()``, from
the tracker's own generator states. Restoring only the default generators would let a resumed run
with dropout draw other masks than the uninterrupted one (issue 17, item 4).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "tracker_states", "set_tracker_states"]

log = logging.getLogger("flexsp.checkpoint")


def _tracker() -> Any | None:
    """Megatron's tracker (``get_cuda_rng_tracker()``), or None where megatron-core is missing or no
    tracker was made yet (asking would create an empty one)."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except Exception:  # noqa: BLE001 - megatron-core absent or broken on this host: nothing to save
        return None
    if not getattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    return mrandom.get_cuda_rng_tracker()


def tracker_states() -> dict[str, torch.Tensor]:
    """The tracker's named states as CPU tensors (empty when it has none, e.g. not seeded)."""
    tracker = _tracker()
    if tracker is None or not tracker.is_initialized():
        return {}
    out = {}
    for name, state in tracker.get_states().items():
        out[name] = state.get_state() if isinstance(state, torch.Generator) else state.clone()
    return out


def set_tracker_states(states: dict[str, torch.Tensor]) -> None:
    """Put saved states back into the tracker (graph-safe generators are updated in place).

    A state the checkpoint lacks (e.g. the SP dropout state, in a checkpoint older than it) keeps
    its seeded value instead of vanishing from the tracker.
    """
    tracker = _tracker()
    if not states or tracker is None:
        return
    current = tracker.get_states() if tracker.is_initialized() else {}
    new = {k: v for k, v in current.items() if k not in states}  # kept as seeded: states the checkpoint lacks
    for name, state in states.items():
        old = current.get(name)
        if isinstance(old, torch.Generator):
            old.set_state(state)
            new[name] = old
        else:
            new[name] = state.clone()
    tracker.set_states(new)


def rng_state() -> dict[str, Any]:
    """This rank's generator states (``tracker`` only where megatron's tracker holds states)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    tracker = tracker_states()
    if tracker:
        st["tracker"] = tracker
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore ``rng_state()``'s output; a checkpoint without tracker states leaves the tracker as seeded."""
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    set_tracker_states(st.get("tracker") or {})
