"""When to save and where to resume from: the trainer's checkpoint policy.

Why apart from ``checkpointing``: that module knows how a checkpoint is written and read on
disk (atomic directories, verification); this one knows *when* (every ``--save-interval``,
before an ``--exit-interval`` exit, at the end of training, never twice for one iteration) and
how a launch resumes (Megatron's auto-resume pattern ``--save X --load X``: the first launch
starts fresh). The Trainer asks ``maybe_save(iteration)`` after every step and ``finish()`` at
the end; it never looks at save flags itself. What is saved is whatever the ``StateRegistry`` holds;
``after_save`` callbacks (the calibrated cost model's file) run after every save.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .checkpoint_dist_writer import DistSaver
from .checkpoint_loader import LoadedCheckpoint, load_state
from .checkpoint_writer import save_state
from .configs import CheckpointConfig
from .state_registry import StateRegistry

__all__ = ["Checkpointer", "SaveDecision"]

log = logging.getLogger("flexsp.train")


@dataclass(frozen=True)
class SaveDecision:
    """What ``maybe_save`` did: whether it saved, and whether the run should stop now."""

    saved: bool
    stop: bool


class Checkpointer:
    """Owns the checkpoint cycle of one run: every state in ``registry``, saved and resumed together.

    The registry's ``state_dict`` functions are called at save time, so what is saved is always current.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        registry: StateRegistry,
        *,
        run_record: dict[str, Any],
        train_iters: int,
        after_save: Sequence[Callable[[int], None]] = (),
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.run_record = run_record
        self.train_iters = train_iters
        self.after_save = list(after_save)
        self.last_saved: int | None = None
        # torch_dist: every rank writes its own shards; with --async-save in the background
        self.saver = DistSaver(async_save=cfg.async_save) if cfg.ckpt_format == "torch_dist" else None
        if self.saver is not None and cfg.save:
            self.saver.prepare()  # collective: the background write's process group, made at start-up

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
        if self.cfg.finetune:
            return self._finetune()
        if self._starts_fresh():
            log.info("no checkpoint in %s yet: starting from scratch", self.cfg.load)
            return None
        loaded = load_state(
            self.cfg.load,
            self.registry,
            load_step=self.cfg.load_step,
            args=self.run_record,
            override_opt_param_scheduler=self.cfg.override_opt_param_scheduler,
        )
        self.last_saved = loaded.iteration
        log.info("resumed from %s at iteration %d", loaded.path, loaded.iteration)
        return loaded

    def _finetune(self) -> LoadedCheckpoint:
        """--finetune: the model weights of ``--load`` alone, at iteration 0 (optimizer, LR schedule, data
        position, planner and RNG stay as this run built and seeded them).

        A relaunch of a fine-tuning job (its ``--save`` already holds a checkpoint) resumes that one in
        full instead: starting over from the base weights would throw its progress away."""
        c = self.cfg
        if c.save and os.path.exists(os.path.join(c.save, "latest")):
            log.info("--finetune: %s already holds this run's checkpoint; resuming it instead of %s", c.save, c.load)
            loaded = load_state(
                c.save, self.registry, args=self.run_record, override_opt_param_scheduler=c.override_opt_param_scheduler
            )
            self.last_saved = loaded.iteration
            log.info("resumed from %s at iteration %d", loaded.path, loaded.iteration)
            return loaded
        loaded = load_state(c.load, self.registry, load_step=c.load_step, model_only=True)
        log.info(
            "--finetune: model weights from %s (its iteration %d); starting at iteration 0",
            loaded.path,
            loaded.iteration,
        )
        return replace(loaded, iteration=0, states={})

    # ------------------------------------------------------------------ save
    def save(self, iteration: int) -> None:
        """Write every registered state now (collective), then run the ``after_save`` callbacks.

        With --async-save the files are written in the background: ``poll`` (every iteration) reports
        the outcome, ``wait`` blocks for it; a new save first waits for the previous one."""
        kw: dict[str, Any] = {"args": self.run_record, "keep_latest_k": self.cfg.keep_latest_k}
        if self.saver is None:
            path = save_state(self.cfg.save, iteration, self.registry, **kw)
            log.info("saved checkpoint %s", path)
        else:
            path = self.saver.save(self.cfg.save, iteration, self.registry, **kw)
            if self.saver.in_flight:
                log.info(
                    "checkpoint %s: written in the background (training blocked %.2f s)", path, self.saver.blocked_s
                )
            else:
                log.info("saved checkpoint %s (%.2f s)", path, self.saver.blocked_s)
        self.last_saved = iteration
        for callback in self.after_save:
            callback(iteration)

    def poll(self) -> None:
        """Between iterations (collective while a background save is in flight): finish a save every
        rank has written; its error, if any, is raised here on every rank as one CheckpointError."""
        if self.saver is not None:
            self.saver.poll()

    def wait(self) -> None:
        """Block until the background save in flight (if any) is complete on disk; raise its error."""
        if self.saver is not None:
            self.saver.wait()

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
        self.wait()  # the run stops: the checkpoint must be on disk before the process exits
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
        self.wait()
