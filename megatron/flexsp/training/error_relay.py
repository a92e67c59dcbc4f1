"""One rule for "rank 0 failed, tell the others": every rank raises the same error.

Why: rank 0 alone decides and does some things (write a checkpoint, pick the checkpoint to load,
build the data cache). If it failed and the other ranks went on, they would block in the next
collective until the timeout; so every such site relays rank 0's outcome with this function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from .distributed import broadcast_object

__all__ = ["relay_error"]


def relay_error(
    error: BaseException | None,
    classes: Sequence[type[BaseException]],
    *,
    src: int = 0,
    group: Any = None,
) -> None:
    """Collective: raise on every rank the error rank ``src`` passes (None: return on every rank).

    ``src`` raises ``error`` itself; the other ranks raise the class of ``classes`` with its name, or
    ``classes[0]``, with the same message. Other ranks' ``error`` arguments are ignored."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else src  # src is a global rank
    payload = (type(error).__name__, str(error)) if rank == src and error is not None else None
    relayed = broadcast_object(payload, src, group)
    if relayed is None:
        return
    if rank == src and error is not None:
        raise error
    name, message = relayed
    cls = {c.__name__: c for c in classes}.get(name, classes[0])
    raise cls(message)
