"""Point megatron.core.parallel_state's context-parallel getters at the micro-batch's SP group.

Why: FlexSP changes the sequence-parallel group every micro-batch. FlexSP's own code never asks
parallel_state for it: the group travels with the data (``PackedSeqParams.cp_group`` /
``local_cp_size``, built once per micro-batch by ``megatron.flexsp.runtime.sp_group``). This
redirection remains only for megatron.core code that still asks
``parallel_state.get_context_parallel_{group,world_size,rank,global_ranks}()`` when it is not
handed a group (RoPE's ``apply_rotary_pos_emb(cp_group=None)``, the loss scaling of
``schedules.forward_step_calc_loss``, ``get_batch_on_this_cp_rank``): while a micro-batch runs
those getters must answer for the micro-batch's group, and for the original setting afterwards.
tests/runtime/test_parallel_state_readers.py holds one test per such reader.

Two mechanisms, both undone on exit of ``redirect``:

* ``install()`` wraps the four getters (module attributes of parallel_state) so they consult
  the active redirection first; callers that look the getters up through the module see it.
* ``redirect()`` also sets parallel_state's private globals ``_CONTEXT_PARALLEL_GROUP`` and
  ``_CONTEXT_PARALLEL_GLOBAL_RANKS`` when they exist (megatron-core 0.16 .. 0.19), so code
  that imported the original getters by name (``from ...parallel_state import get_...``)
  answers for the same group.

Only the context-parallel getters are redirected; combined groups (tensor-and-context,
data-and-context) keep their start-up value. With tensor parallelism (issue 20) megatron's TP
group is the unit of t consecutive ranks, set once at start-up and never redirected; the
micro-batch's SP group is then the same-TP-rank ranks of the group's units (the runtime's
``GroupPool.members``), which is what the redirected getters answer.
This module knows nothing of FlexSP's runtime (the layers: patches never import it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["install", "is_installed", "redirect"]

_GETTERS = (
    "get_context_parallel_group",
    "get_context_parallel_world_size",
    "get_context_parallel_rank",
    "get_context_parallel_global_ranks",
)
_PATCH_MARK = "__flexsp_patched__"


@dataclass(frozen=True)
class _Redirect:
    """What the getters answer while a redirection is active."""

    group: Any  # torch.distributed.ProcessGroup
    ranks: tuple[int, ...]  # global ranks, position = rank inside the group
    rank: int  # this process's rank inside the group

    def answer(self, getter: str) -> Any:
        if getter == "get_context_parallel_group":
            return self.group
        if getter == "get_context_parallel_world_size":
            return len(self.ranks)
        if getter == "get_context_parallel_rank":
            return self.rank
        return list(self.ranks)


_STACK: list[_Redirect] = []


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def getter(*args: Any, **kwargs: Any) -> Any:
        return _STACK[-1].answer(name) if _STACK else original(*args, **kwargs)

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
        if not getattr(current, _PATCH_MARK, False):
            setattr(ps, name, _wrap(name, current))


def is_installed() -> bool:
    ps = _ps()
    return all(getattr(getattr(ps, n, None), _PATCH_MARK, False) for n in _GETTERS)


@contextlib.contextmanager
def redirect(group: Any, ranks: tuple[int, ...], rank: int) -> Iterator[None]:
    """parallel_state's context-parallel getters answer for ``group`` while the block runs (nestable)."""
    install()
    ps = _ps()
    active = _Redirect(group=group, ranks=tuple(ranks), rank=int(rank))
    has_globals = hasattr(ps, "_CONTEXT_PARALLEL_GROUP") and hasattr(ps, "_CONTEXT_PARALLEL_GLOBAL_RANKS")
    saved = (ps._CONTEXT_PARALLEL_GROUP, ps._CONTEXT_PARALLEL_GLOBAL_RANKS) if has_globals else None
    _STACK.append(active)
    if has_globals:
        ps._CONTEXT_PARALLEL_GROUP = group
        ps._CONTEXT_PARALLEL_GLOBAL_RANKS = list(active.ranks)
    try:
        yield
    finally:
        _STACK.pop()
        if has_globals:
            ps._CONTEXT_PARALLEL_GROUP, ps._CONTEXT_PARALLEL_GLOBAL_RANKS = saved
