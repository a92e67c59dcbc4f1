"""Per-micro-batch SP group for megatron.core.parallel_state's context-parallel getters.

Why: FlexSP changes the sequence-parallel group every micro-batch. Our own code does not need
this module to find it: the executor passes the group with the data
(``PackedSeqParams.cp_group`` / ``local_cp_size``) and ``FlexSPCoreAttention`` reads it from
there first. This redirection remains only for megatron.core code that still asks
``parallel_state.get_context_parallel_{group,world_size,rank,global_ranks}()`` for "my
sequence-parallel group" (RoPE helpers, loss and embedding utilities, any layer that does not
take the group as an argument): while a micro-batch runs those getters must answer for the
micro-batch's group, and for the original setting afterwards.

Two mechanisms, both undone on exit:

* ``install()`` wraps the four getters (module attributes of parallel_state) so they consult
  the active FlexSP group first; callers that look the getters up through the module see it.
* ``sp_group()`` also sets parallel_state's private globals ``_CONTEXT_PARALLEL_GROUP`` and
  ``_CONTEXT_PARALLEL_GLOBAL_RANKS`` when they exist (megatron-core 0.16 .. 0.19), so code
  that imported the original getters by name (``from ...parallel_state import get_...``)
  answers for the same group.

Only the context-parallel getters are redirected; combined groups (tensor-and-context,
data-and-context) keep their start-up value, as FlexSP runs without tensor parallelism.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["install", "uninstall", "is_installed", "sp_group", "current_sp_group", "ActiveSPGroup"]

_GETTERS = (
    "get_context_parallel_group",
    "get_context_parallel_world_size",
    "get_context_parallel_rank",
    "get_context_parallel_global_ranks",
)
_ORIGINALS: dict[str, Any] = {}
_PATCH_MARK = "__flexsp_patched__"


@dataclass(frozen=True)
class ActiveSPGroup:
    group: Any  # torch.distributed.ProcessGroup
    ranks: tuple[int, ...]  # global ranks, position = rank inside the group
    rank: int  # this process's rank inside the group

    @property
    def world_size(self) -> int:
        return len(self.ranks)


_STACK: list[ActiveSPGroup] = []


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def current_sp_group() -> ActiveSPGroup | None:
    """The innermost active FlexSP SP group, or None outside ``sp_group``."""
    return _STACK[-1] if _STACK else None


def _wrap(name: str, original):
    @functools.wraps(original)
    def getter(*args, **kwargs):
        active = current_sp_group()
        if active is None:
            return original(*args, **kwargs)
        if name == "get_context_parallel_group":
            return active.group
        if name == "get_context_parallel_world_size":
            return active.world_size
        if name == "get_context_parallel_rank":
            return active.rank
        return list(active.ranks)

    setattr(getter, _PATCH_MARK, True)
    return getter


def install() -> None:
    """Wrap parallel_state's context-parallel getters (idempotent)."""
    ps = _ps()
    for name in _GETTERS:
        current = getattr(ps, name, None)
        if current is None:
            raise RuntimeError(
                f"megatron.core.parallel_state has no '{name}'; this megatron-core version is unsupported"
            )
        if getattr(current, _PATCH_MARK, False):
            continue
        _ORIGINALS[name] = current
        setattr(ps, name, _wrap(name, current))


def uninstall() -> None:
    """Put the original getters back (for tests; refuses while a group is active)."""
    if _STACK:
        raise RuntimeError("cannot uninstall the parallel_state patch inside an active sp_group")
    ps = _ps()
    for name, fn in list(_ORIGINALS.items()):
        setattr(ps, name, fn)
        del _ORIGINALS[name]


def is_installed() -> bool:
    ps = _ps()
    return all(getattr(getattr(ps, n, None), _PATCH_MARK, False) for n in _GETTERS)


@contextlib.contextmanager
def sp_group(pool, ranks: Sequence[int]) -> Iterator[ActiveSPGroup]:
    """Make ``ranks`` (a group of ``pool``) the context-parallel group while the block runs.

    Raises (locally, before any communication) if the group is not in the pool or this rank is
    not one of its members; since every rank reads the same plan, every rank raises alike.
    """
    group = pool.get(ranks)  # GroupPoolError naming the ranks and the pool if absent
    key = tuple(int(r) for r in ranks)
    me = dist.get_rank()
    if me not in key:
        raise ValueError(f"rank {me} cannot enter SP group {list(key)}: it is not a member")
    install()
    ps = _ps()
    active = ActiveSPGroup(group=group, ranks=key, rank=key.index(me))
    has_globals = hasattr(ps, "_CONTEXT_PARALLEL_GROUP") and hasattr(ps, "_CONTEXT_PARALLEL_GLOBAL_RANKS")
    saved = (ps._CONTEXT_PARALLEL_GROUP, ps._CONTEXT_PARALLEL_GLOBAL_RANKS) if has_globals else None
    _STACK.append(active)
    if has_globals:
        ps._CONTEXT_PARALLEL_GROUP = group
        ps._CONTEXT_PARALLEL_GLOBAL_RANKS = list(key)
    try:
        yield active
    finally:
        _STACK.pop()
        if has_globals:
            ps._CONTEXT_PARALLEL_GROUP, ps._CONTEXT_PARALLEL_GLOBAL_RANKS = saved
