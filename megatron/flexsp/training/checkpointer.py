"""When to save and where to resume from: the trainer's checkpoint policy.

Why apart from ``checkpointing``: that module knows how a checkpoint is written and read on
disk (atomic directories, verification); this one knows *when* (every ``--save-interval``,
before an ``--exit-interval`` exit, at the end of training, never twice for one iteration) and
how a launch resumes (Megatron's auto-resume pattern ``--save X --load X``: the first launch
starts fresh). The Trainer asks ``maybe_save(iteration)`` after every step and ``finish()`` at
the end; it never looks at save flags itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .checkpointing import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .configs import CheckpointConfig

__all__ = ["Checkpointer", "SaveDecision"]

log = logging.getLogger("flexsp.train")


@dataclass(frozen=True)
class SaveDecision:
    """What ``maybe_save`` did: whether it saved, and whether the run should stop now."""

    saved: bool
    stop: bool


class Checkpointer:
    """Owns the model/optimizer/scheduler checkpoint cycle of one run.

    ``state_fns`` are called at save time for the small states that ride along (sampler position,
    planner state), so what is saved is always current.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        state_fns: dict[str, Callable[[], Any]],
        run_record: dict[str, Any],
        train_iters: int,
    ) -> None:
        self.cfg = cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.state_fns = state_fns
        self.run_record = run_record
        self.train_iters = train_iters
        self.last_saved: int | None = None

    # ---------------------------------------------------------------- resume
    def _starts_fresh(self) -> bool:
        """Megatron's auto-resume pattern (--save X --load X): the first launch has nothing to load."""
        c = self.cfg
        return bool(
            c.load
            and c.save
            and os.path.realpath(c.load) == os.path.realpath(c.save)
            and not os.path.exists(os.path.join(c.load, "latest"))
        )

    def resume(self) -> LoadedCheckpoint | None:
        """Load ``--load`` (collective) or return None when this run starts from scratch."""
        if not self.cfg.load:
            return None
        if self._starts_fresh():
            log.info("no checkpoint in %s yet: starting from scratch", self.cfg.load)
            return None
        loaded = load_checkpoint(
            self.cfg.load,
            self.model,
            self.optimizer,
            self.scheduler,
            load_step=self.cfg.load_step,
            args=self.run_record,
            override_opt_param_scheduler=self.cfg.override_opt_param_scheduler,
        )
        self.last_saved = loaded.iteration
        log.info("resumed from %s at iteration %d", loaded.path, loaded.iteration)
        return loaded

    # ------------------------------------------------------------------ save
    def save(self, iteration: int) -> None:
        states = {name: fn() for name, fn in self.state_fns.items()}
        path = save_checkpoint(
            self.cfg.save,
            iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            sampler_state=states.get("sampler"),
            planner_state=states.get("planner"),
            extra=states.get("extra"),
            args=self.run_record,
            keep_latest_k=self.cfg.keep_latest_k,
        )
        self.last_saved = iteration
        log.info("saved checkpoint %s", path)

    def _should_save(self, iteration: int) -> bool:
        c = self.cfg
        return bool(c.save and c.save_interval and iteration % c.save_interval == 0)

    def _should_exit(self, iteration: int) -> bool:
        return bool(self.cfg.exit_interval and iteration % self.cfg.exit_interval == 0)

    def maybe_save(self, iteration: int, *, exit_reason: str | None = None) -> SaveDecision:
        """After the step of ``iteration``: save on the interval; on --exit-interval or an exit request
        (``exit_reason``: a signal or the deadline, decided by all ranks) save (if --save) and stop."""
        saved = False
        if self._should_save(iteration):
            self.save(iteration)
            saved = True
        if self._should_exit(iteration):
            exit_reason = exit_reason or f"--exit-interval {self.cfg.exit_interval}"
        if exit_reason is None:
            return SaveDecision(saved, stop=False)
        if self.cfg.save and self.last_saved != iteration:
            self.save(iteration)
            saved = True
        log.info(
            "exiting after iteration %d (%s)%s",
            iteration,
            exit_reason,
            "" if self.cfg.save else "; no --save, so nothing was saved",
        )
        return SaveDecision(saved, stop=True)

    def finish(self, iteration: int) -> None:
        """End of training: the final save, unless --no-save-final or already saved at this iteration."""
        if self.cfg.save and self.cfg.save_final and self.last_saved != iteration:
            self.save(iteration)
