"""The pool of sequence-parallel process groups: a fixed set, each group made on its first use.

Why a pool: a plan draws its groups from a fixed set (the planner's
``placement.candidate_groups``), so a micro-batch only looks groups up and an unknown group is
a local error before any communication.

Why lazy: an eager ``new_group`` is collective over the whole world, once per group, and the
pool holds a group per degree and offset (31 groups at 16 ranks, hundreds at 64+), so start-up
grew with the group count. A lazy pool makes a group with
``new_group(ranks, use_local_synchronization=True)`` when its members first enter it: only the
members synchronise, and a rank's groups are made in the same order on every member (the plan is
the same everywhere, and in one micro-batch each rank is in exactly one group, so overlapping
groups are never made at once). NCCL communicators are then made by the first collective of
each group (``init_distributed`` does not bind ``device_id``, which would make every
``new_group`` split the world's communicator eagerly). ``lazy=False`` keeps the eager creation.

Tensor parallelism (issue 20, contract C6): with ``tensor_parallel_size`` t the ranks form units
of t consecutive ranks (rank r: unit r // t, TP rank r % t). A plan's groups are unit groups, so
the pool's groups are too (``groups``, ``check_partition``, ``group_of`` speak units). The
Ulysses exchange of a unit group runs among the ranks of the same TP rank, so each unit group
stands for t process groups, one per TP rank ([u * t + j for u in units]); ``members(units)``
gives this rank's, and ``get`` takes those global ranks. At t = 1 units are ranks and nothing
changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

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


def _local_sync_supported() -> bool:
    """torch >= 2.1's ``new_group(use_local_synchronization=...)``: needed for a lazy pool."""
    try:
        return "use_local_synchronization" in inspect.signature(dist.new_group).parameters
    except (TypeError, ValueError):
        return False


class GroupPool:
    """Process groups for every rank tuple a plan may use, looked up by their ranks.

    Groups are keyed by the exact rank tuple (a plan's ``Group.ranks``): the position of a rank
    in the tuple is its rank inside the SP group, which decides which contiguous slice of the
    packed tokens it holds. ``torch.distributed.new_group`` orders a group's ranks ascending,
    and the all-to-all exchanges slices in that order, so only ascending tuples are accepted:
    an unsorted group would silently scramble tokens.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        backend: str | None = None,
        *,
        timeout=None,
        lazy: bool = True,
        tensor_parallel_size: int = 1,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise GroupPoolError("GroupPool needs torch.distributed to be initialised first (init_process_group)")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        t = tensor_parallel_size
        if isinstance(t, bool) or not isinstance(t, int) or t < 1 or self.world_size % t:
            raise GroupPoolError(
                f"tensor_parallel_size {t!r} must be a positive divisor of the world size {self.world_size}"
            )
        self.tensor_parallel_size = t
        self.num_units = self.world_size // t  # the planning ranks: units of t GPUs (GPUs at t = 1)
        self.unit, self.tp_rank = divmod(self.rank, t)
        keys: list[tuple[int, ...]] = []
        for g in groups:
            key = _key(g)
            if not key:
                raise GroupPoolError("empty group in the pool's group list")
            if len(set(key)) != len(key):
                raise GroupPoolError(f"group {list(key)} repeats a rank")
            _check_sorted(key)
            bad = [r for r in key if not 0 <= r < self.num_units]
            if bad:
                what = "ranks" if t == 1 else f"units (of {t} ranks)"
                raise GroupPoolError(f"group {list(key)} has {what} {bad} outside the world 0..{self.num_units - 1}")
            if key in keys:
                raise GroupPoolError(f"group {list(key)} is listed twice")
            keys.append(key)
        self._backend = backend
        self._kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        self.lazy = lazy and _local_sync_supported()
        self.created = 0  # process groups made so far by this rank (the world's is reused, not counted)
        world = tuple(range(self.world_size))
        self._units = keys  # the plan's view: unit groups (rank groups at t = 1)
        gpu_keys = [tuple(u * t + j for u in key) for key in keys for j in range(t)]  # one per TP rank
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {
            key: (dist.group.WORLD if key == world else None) for key in gpu_keys
        }
        if not self.lazy:
            for key in gpu_keys:  # same order on every rank: an eager new_group is collective over the world
                if self._groups[key] is None:
                    self._groups[key] = self._make(key, local=False)

    def _make(self, key: tuple[int, ...], *, local: bool) -> dist.ProcessGroup:
        kwargs = dict(self._kwargs, use_local_synchronization=True) if local else self._kwargs
        self.created += 1
        return dist.new_group(list(key), backend=self._backend, **kwargs)

    @classmethod
    def from_cost_model(
        cls,
        cost: CostModel,
        world_size: int | None = None,
        backend: str | None = None,
        *,
        tensor_parallel_size: int = 1,
        **kwargs,
    ) -> GroupPool:
        """All candidate groups of the planner (aligned blocks of every allowed degree).

        At TP t the planner plans over the units with the unit cost model (``cost`` may be the
        per-GPU model or already the unit one), so the pool holds the same unit groups.
        """
        from megatron.flexsp.planner.placement import candidate_groups
        from megatron.flexsp.planner.tensor_parallel import unit_cost_model, unit_size

        ws = dist.get_world_size() if world_size is None else world_size
        if dist.is_initialized() and ws != dist.get_world_size():
            raise GroupPoolError(f"world_size {ws} differs from torch.distributed's {dist.get_world_size()}")
        t = tensor_parallel_size
        if t > 1 and unit_size(cost) != t:
            cost = unit_cost_model(cost, t)
        return cls(candidate_groups(cost, ws // t), backend=backend, tensor_parallel_size=t, **kwargs)

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
        """The groups a plan may use (unit groups at TP > 1)."""
        return list(self._units)

    @property
    def degrees(self) -> list[int]:
        """The sizes of the pool's groups, ascending: the SP degrees (in units) a plan may use."""
        return sorted({len(k) for k in self._units})

    def group_of(self, rank: int, degree: int) -> tuple[int, ...] | None:
        """The pool's first group of ``degree`` that holds planning rank (unit) ``rank``, or None (no collective)."""
        return next((k for k in self._units if len(k) == degree and rank in k), None)

    def members(self, units: Iterable[int]) -> tuple[int, ...]:
        """The global ranks this rank exchanges with in unit group ``units``: the same TP rank in each unit."""
        key = _key(units)
        if key not in self._units:
            self._known_unit(key)
        return tuple(u * self.tensor_parallel_size + self.tp_rank for u in key)

    def __contains__(self, ranks: Iterable[int]) -> bool:
        return _key(ranks) in self._units

    def __len__(self) -> int:
        return len(self._units)

    def get(self, ranks: Sequence[int]) -> dist.ProcessGroup:
        """The process group of exactly these ranks; GroupPoolError (local, no collective) if absent.

        Lazy pool: the first call by a member makes the group (its members only synchronise);
        a non-member gets ``GroupMember.NON_GROUP_MEMBER`` and makes nothing.
        """
        key = _key(ranks)
        if key not in self._groups:
            _check_sorted(key)
            raise GroupPoolError(
                f"SP group {list(key)} is not in the group pool (its groups are fixed at start-up; "
                f"pool holds {len(self._units)} {'groups' if self.tensor_parallel_size == 1 else 'unit groups'}: "
                f"{self._describe()})"
            )
        group = self._groups[key]
        if group is None:
            if self.rank not in key:
                return dist.GroupMember.NON_GROUP_MEMBER
            group = self._groups[key] = self._make(key, local=True)
        return group

    def _known_unit(self, key: tuple[int, ...]) -> None:
        """Raise GroupPoolError unless ``key`` is a pool (unit) group (no group is made)."""
        if key not in self._units:
            _check_sorted(key)
            raise GroupPoolError(
                f"SP group {list(key)} is not in the group pool (its groups are fixed at start-up; "
                f"pool holds {len(self._groups)} groups: {self._describe()})"
            )

    def check_partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Raise unless ``groups`` are pool groups that partition all ranks (one micro-batch).

        Every rank sees the same plan, so every rank raises the same error before any
        collective starts: a bad plan fails everywhere at once instead of hanging.
        """
        seen: dict[int, tuple[int, ...]] = {}
        for g in groups:
            key = _key(g)
            self._known_unit(key)
            for r in key:
                if r in seen:
                    raise GroupPoolError(
                        f"rank {r} is in two groups of one micro-batch: {list(seen[r])} and {list(key)}"
                    )
                seen[r] = key
        missing = sorted(set(range(self.num_units)) - set(seen))
        if missing:
            raise GroupPoolError(
                f"ranks {missing} are in no group of the micro-batch (groups: {[list(_key(g)) for g in groups]})"
            )

    def _describe(self, limit: int = 12) -> str:
        keys = [list(k) for k in self._units]
        text = ", ".join(str(k) for k in keys[:limit])
        return text + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

    def __repr__(self) -> str:
        tp = f", tensor_parallel_size={self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else ""
        return f"GroupPool(world_size={self.world_size}{tp}, groups=[{self._describe()}])"
