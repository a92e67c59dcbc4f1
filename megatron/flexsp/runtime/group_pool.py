"""The pool of sequence-parallel process groups, created once at start-up.

Why a pool: ``torch.distributed.new_group`` is collective over the whole world and (on NCCL)
builds a communicator, so it cannot run per micro-batch. Every plan draws its groups from a
fixed set (the planner's ``placement.candidate_groups``); the runtime creates exactly that set,
in the same order on every rank, and a micro-batch only looks groups up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:  # the planner is torch-free; only its types are needed here
    from megatron.flexsp.planner.costmodel import CostModel

__all__ = ["GroupPoolError", "GroupPool"]


class GroupPoolError(ValueError):
    """A group that is not in the pool, or a malformed group list; the message names it."""


def _key(ranks: Iterable[int]) -> tuple[int, ...]:
    try:
        key = tuple(int(r) for r in ranks)
    except (TypeError, ValueError):
        raise GroupPoolError(f"a group must be a sequence of integer ranks, got {ranks!r}") from None
    return key


def _check_sorted(key: tuple[int, ...]) -> None:
    """Rank-in-group must be the position in the tuple; process groups number ranks ascending."""
    if list(key) != sorted(key):
        raise GroupPoolError(
            f"group {list(key)} is not in ascending rank order: torch.distributed numbers a "
            f"group's ranks ascending ({sorted(key)}), so position in this list would not be "
            f"the rank in the group and tokens would be exchanged in the wrong order"
        )


class GroupPool:
    """Process groups for every rank tuple a plan may use, looked up by their ranks.

    Groups are keyed by the exact rank tuple (a plan's ``Group.ranks``): the position of a rank
    in the tuple is its rank inside the SP group, which decides which contiguous slice of the
    packed tokens it holds. ``torch.distributed.new_group`` orders a group's ranks ascending,
    and the all-to-all exchanges slices in that order, so only ascending tuples are accepted:
    an unsorted group would silently scramble tokens.
    """

    def __init__(self, groups: Sequence[Sequence[int]], backend: str | None = None, *, timeout=None):
        if not dist.is_available() or not dist.is_initialized():
            raise GroupPoolError("GroupPool needs torch.distributed to be initialised first (init_process_group)")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        keys: list[tuple[int, ...]] = []
        for g in groups:
            key = _key(g)
            if not key:
                raise GroupPoolError("empty group in the pool's group list")
            if len(set(key)) != len(key):
                raise GroupPoolError(f"group {list(key)} repeats a rank")
            _check_sorted(key)
            bad = [r for r in key if not 0 <= r < self.world_size]
            if bad:
                raise GroupPoolError(f"group {list(key)} has ranks {bad} outside the world 0..{self.world_size - 1}")
            if key in keys:
                raise GroupPoolError(f"group {list(key)} is listed twice")
            keys.append(key)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        world = tuple(range(self.world_size))
        for key in keys:  # same order on every rank: new_group is collective over the world
            if key == world:
                self._groups[key] = dist.group.WORLD  # reuse the default group, no extra communicator
                continue
            kwargs = {} if timeout is None else {"timeout": timeout}
            self._groups[key] = dist.new_group(list(key), backend=backend, **kwargs)

    @classmethod
    def from_cost_model(
        cls, cost: CostModel, world_size: int | None = None, backend: str | None = None, **kwargs
    ) -> GroupPool:
        """All candidate groups of the planner (aligned blocks of every allowed degree)."""
        from megatron.flexsp.planner.placement import candidate_groups

        ws = dist.get_world_size() if world_size is None else world_size
        if dist.is_initialized() and ws != dist.get_world_size():
            raise GroupPoolError(f"world_size {ws} differs from torch.distributed's {dist.get_world_size()}")
        return cls(candidate_groups(cost, ws), backend=backend, **kwargs)

    @classmethod
    def aligned(
        cls, degrees: Sequence[int], world_size: int | None = None, backend: str | None = None, **kwargs
    ) -> GroupPool:
        """Aligned blocks [k*d, (k+1)*d) of every degree d in ``degrees`` (tests, fixed-degree runs)."""
        ws = dist.get_world_size() if world_size is None else world_size
        bad = [d for d in degrees if d < 1 or ws % d]
        if bad:
            raise GroupPoolError(f"degrees {bad} do not divide the world size {ws}")
        groups = [tuple(range(b, b + d)) for d in dict.fromkeys(degrees) for b in range(0, ws, d)]
        return cls(groups, backend=backend, **kwargs)

    # ------------------------------------------------------------------ lookups
    @property
    def groups(self) -> list[tuple[int, ...]]:
        return list(self._groups)

    @property
    def degrees(self) -> list[int]:
        """The sizes of the pool's groups, ascending: the SP degrees a plan may use."""
        return sorted({len(k) for k in self._groups})

    def group_of(self, rank: int, degree: int) -> tuple[int, ...] | None:
        """The pool's first group of ``degree`` that holds ``rank``, or None (lookup only, no collective)."""
        return next((k for k in self._groups if len(k) == degree and rank in k), None)

    def __contains__(self, ranks: Iterable[int]) -> bool:
        return _key(ranks) in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def get(self, ranks: Sequence[int]) -> dist.ProcessGroup:
        """The process group of exactly these ranks; GroupPoolError (local, no collective) if absent."""
        key = _key(ranks)
        try:
            return self._groups[key]
        except KeyError:
            _check_sorted(key)
            raise GroupPoolError(
                f"SP group {list(key)} is not in the group pool (groups are created once at start-up; "
                f"pool holds {len(self._groups)} groups: {self._describe()})"
            ) from None

    def check_partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Raise unless ``groups`` are pool groups that partition all ranks (one micro-batch).

        Every rank sees the same plan, so every rank raises the same error before any
        collective starts: a bad plan fails everywhere at once instead of hanging.
        """
        seen: dict[int, tuple[int, ...]] = {}
        for g in groups:
            key = _key(g)
            self.get(key)
            for r in key:
                if r in seen:
                    raise GroupPoolError(
                        f"rank {r} is in two groups of one micro-batch: {list(seen[r])} and {list(key)}"
                    )
                seen[r] = key
        missing = sorted(set(range(self.world_size)) - set(seen))
        if missing:
            raise GroupPoolError(
                f"ranks {missing} are in no group of the micro-batch (groups: {[list(_key(g)) for g in groups]})"
            )

    def _describe(self, limit: int = 12) -> str:
        keys = [list(k) for k in self._groups]
        text = ", ".join(str(k) for k in keys[:limit])
        return text + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

    def __repr__(self) -> str:
        return f"GroupPool(world_size={self.world_size}, groups=[{self._describe()}])"
