"""The resumable-state registry: everything that must survive a restart, registered once.

Why: a checkpoint is only as good as the list of what it holds. Each component (model, optimizer,
scheduler, RNG, data position, planner, calibration, ...) registers a name, its
``state_dict``/``load_state_dict`` and its scope here; the checkpoint writer and loader iterate
the registry, so adding one more piece of state is one ``register`` call and nothing else.

Where each entry lives on disk (``file`` and ``key``) is part of the registration, which is how
the format that predates the registry (``trainer.pt`` holding ``scheduler``, ``sampler``,
``planner``, ``rng`` and ``extra.*``) stays the format, byte for byte in structure.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .checkpoint_format import TRAINER_FILE

__all__ = ["Scope", "ShardedForm", "StateEntry", "StateRegistry", "ValueBox"]


class Scope(enum.Enum):
    """How an entry's state relates to the ranks.

    GLOBAL: the same on every rank; rank 0's is saved, every rank loads it.
    PER_RANK: each rank's own (RNG); saved as a list by rank, each rank loads its own element
    (not loaded when the checkpoint had another number of ranks).
    COLLECTIVE: ``state_dict`` is a collective returning the full state on rank 0 (model,
    optimizer: gathered from shards); ``load_state_dict`` is a collective that gets the full state
    on rank 0 and None elsewhere, and distributes it itself (the ``torch`` format). Such an entry
    may also give its ``sharded`` form (``ShardedForm``), which the ``torch_dist`` format uses:
    every rank saves and loads only its own shards, resharded on load.
    """

    GLOBAL = "global"
    PER_RANK = "per_rank"
    COLLECTIVE = "collective"


@dataclass(frozen=True)
class ShardedForm:
    """A COLLECTIVE entry's shard-local form: ``state_dict`` gives this rank's sharded state dict
    (DTensors, no communication), which is also the template a load fills in place before
    ``load_state_dict`` takes it back."""

    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], Any]


@dataclass(frozen=True)
class StateEntry:
    """One component's resumable state: how to take it, how to give it back, where it lives."""

    name: str
    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], Any]
    scope: Scope = Scope.GLOBAL
    file: str = TRAINER_FILE
    key: tuple[str, ...] = ()  # the path inside ``file``; () is the whole file (only for a file of its own)
    sharded: ShardedForm | None = None  # COLLECTIVE entries: the per-rank form the torch_dist format saves

    @property
    def address(self) -> str:
        return "/".join((self.file, *self.key))


class StateRegistry:
    """Ordered entries: saved in this order, and loaded in it (the model before its optimizer)."""

    def __init__(self) -> None:
        self._entries: dict[str, StateEntry] = {}

    def register(
        self,
        name: str,
        state_dict: Callable[[], Any],
        load_state_dict: Callable[[Any], Any],
        *,
        scope: Scope = Scope.GLOBAL,
        file: str = TRAINER_FILE,
        key: tuple[str, ...] | None = None,
        sharded: ShardedForm | None = None,
    ) -> StateEntry:
        """Add one component; ``key`` defaults to ``(name,)`` in trainer.pt and to the whole file elsewhere."""
        if name in self._entries:
            raise ValueError(f"state {name!r} is registered twice")
        if sharded is not None and scope is not Scope.COLLECTIVE:
            raise ValueError(f"state {name!r}: only a COLLECTIVE entry has a sharded form")
        if key is None:
            key = (name,) if file == TRAINER_FILE else ()
        entry = StateEntry(name, state_dict, load_state_dict, scope, file, tuple(key), sharded)
        self._check_address(entry)
        self._entries[name] = entry
        return entry

    def _check_address(self, new: StateEntry) -> None:
        """Two entries at one place, or one inside another, would overwrite each other on save."""
        if new.file == TRAINER_FILE and not new.key:
            raise ValueError(f"state {new.name!r}: trainer.pt is shared, give it a key")
        for e in self._entries.values():
            if e.file != new.file:
                continue
            short = min(len(e.key), len(new.key))
            if e.key[:short] == new.key[:short]:
                raise ValueError(f"state {new.name!r} at {new.address} overlaps {e.name!r} at {e.address}")

    def __iter__(self) -> Iterator[StateEntry]:
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> StateEntry:
        return self._entries[name]

    def files(self) -> list[str]:
        """The files a checkpoint of this registry has, trainer.pt always among them."""
        out = [TRAINER_FILE]
        for e in self:
            if e.file not in out:
                out.append(e.file)
        return out

    def only(self, *names: str) -> StateRegistry:
        """A registry of just these entries (same registrations): --finetune restores the model alone."""
        out = StateRegistry()
        for name in names:
            out._entries[name] = self._entries[name]
        return out

    def by_file(self, file: str) -> StateEntry | None:
        """The entry that owns ``file`` whole (model.pt, optim.pt), if any."""
        return next((e for e in self if e.file == file and not e.key), None)


class ValueBox:
    """A plain value as a registry component: saves what it holds, holds what it loaded.

    Why: callers that hand over a ready state (``save_checkpoint(..., sampler_state=...)``, tests)
    and read back what a checkpoint held use the same registry path as live components."""

    def __init__(self, value: Any = None) -> None:
        self.value = value
        self.loaded = False

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, value: Any) -> None:
        self.value, self.loaded = value, True


def place(tree: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    """``tree[key[0]][key[1]]... = value``, making the inner dicts."""
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def lookup(tree: Any, key: tuple[str, ...]) -> Any:
    """``tree[key[0]][key[1]]...``, or None where a level is missing (a checkpoint older than the entry)."""
    for k in key:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree
