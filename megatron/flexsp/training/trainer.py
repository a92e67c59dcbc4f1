"""The Trainer: set-up in dependency order, then one ``train_step`` per global batch.

Set-up: process group and patches -> seeds -> datasets and sampler (rank 0 first: it may build
the corpus cache) -> planner hook (rank 0 plans ahead in a background process) -> model,
sharding, SP group pool, executor -> optimizer -> checkpointer, metrics. Iteration k
(``train_step``): the plan of batch k (planned ahead on rank 0, broadcast) -> the batch's
documents -> executor (forward/backward of every micro-batch of the plan) -> global-norm clip
-> AdamW step -> an ``IterationRecord``. ``train`` only orchestrates: each component owns its
"should I act now?" rule (``Checkpointer.maybe_save``, ``MetricsLogger.log``,
``Trainer.should_validate``). Every sp-mode uses this same loop and the same batches in the same
order; only the plan differs, so losses are comparable to the last digit.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.flexsp.planner.api import PlannerConfig
from megatron.flexsp.planner.plan import Plan, estimate_plan_ms
from megatron.flexsp.runtime.build import build_runtime
from megatron.flexsp.runtime.executor import StepResult
from megatron.flexsp.runtime.sharding import tensor_parallel_grad_norm

from .checkpointer import Checkpointer
from .configs import TrainerConfigs
from .core_state import register_core
from .distributed import LaunchEnv, broadcast_object, init_distributed
from .logging_utils import IterationRecord, MetricsLogger, setup_logging
from .online_calibration import OnlineCalibration
from .optimizer import build_optimizer, clip_grad_norm
from .paired_baseline import PairedBaseline, StepRun, plain_step
from .planner_hook import PlannerHook, plan_inline
from .resilience import WATCHDOG_SHARE_OF_TIMEOUT, ExitMonitor, NonFiniteGuard, ProgressWatchdog
from .seeding import seed_everything
from .state_registry import StateRegistry
from .step_maxima import StepMaxima
from .summary import format_summary, summarize
from .train_data import build_train_data

__all__ = ["Trainer"]

log = logging.getLogger("flexsp.train")


def _stat(stats: dict[str, Any], *keys: str) -> float:
    return float(sum(float(stats.get(k, 0.0) or 0.0) for k in keys))


# --------------------------------------------------------------------------- trainer


class Trainer:
    """One training run on this rank. ``train()`` returns rank 0's records (an empty list elsewhere)."""

    def __init__(self, cfg: TrainerConfigs, env: LaunchEnv) -> None:
        self.cfg, self.env = cfg, env
        self.started = time.monotonic()
        timeout_s = 60.0 * cfg.distributed.timeout_minutes
        self.device = init_distributed(env, cfg.distributed.backend, timeout_s=timeout_s)
        setup_logging(env.rank)
        from flexsp_patches import cpu_compat

        # TP units (issue 20): megatron's TP groups exist before seeding, which then keeps them.
        t = cfg.model.tensor_model_parallel_size
        cpu_compat.init_model_parallel(cfg.train.seed, device_type=self.device.type, tensor_model_parallel_size=t)
        seed_everything(cfg.train.seed, self.device.type, env.rank)
        fx = cfg.flexsp
        log.info(
            "FlexSP-Megatron: %d ranks (%s, %s), sp-mode %s; %s",
            env.world_size,
            dist.get_backend(),
            self.device.type,
            fx.sp_mode,
            cfg.cost_note or f"cost model '{cfg.cost.name}'",
        )
        if cfg.train.micro_batch_size is not None:
            log.warning(
                "--micro-batch-size %d is ignored: the planner chooses the micro-batches of every global batch",
                cfg.train.micro_batch_size,
            )
        self.data = build_train_data(cfg, env.rank)
        self.planner_cfg = fx.planner_config(env.world_size)
        self.baseline_cfg = fx.planner_config(env.world_size, fx.compare_with) if fx.compare_with else None
        self.hook = PlannerHook(
            cfg.cost,
            self.planner_cfg,
            self.data.sampler.batch_lengths if env.rank == 0 else None,
            plan_ahead=fx.plan_ahead,
            rank=env.rank,
            dump_dir=fx.dump_plans,
            max_iterations=cfg.train.train_iters,
        )
        try:
            self._build_model()
        except BaseException:
            self.hook.close()
            raise
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps)
        self.calibration = OnlineCalibration(cfg.cost, enabled=fx.calibrate, rank=env.rank, world_size=env.world_size)
        self.iter_ms: list[float] = []  # recent iteration times: --flexsp-time-limit auto follows them
        # recent iteration time outside forward + backward (estimated_iter_ms); None: this process's first
        # step is still to come, which also pays one-time costs (the first plan's wait, lazy set-up): not kept
        self.rest_ms: list[float] | None = None
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self._resumable_state(),
            run_record=cfg.run_record,
            train_iters=cfg.train.train_iters,
            after_save=[lambda _it: self._write_calibrated()],
        )
        self.exit = ExitMonitor(
            signal_name=cfg.checkpoint.exit_signal,
            duration_mins=cfg.checkpoint.exit_duration_in_mins,
            start_time=self.started,
        )
        self.exit_vote: tuple[float, float] | None = None  # every rank's (signal, deadline) vote, if any
        self.metrics: MetricsLogger | None = None
        self.watchdog: ProgressWatchdog | None = None

    def _build_model(self) -> None:
        """The runtime (the profiler's builder too), the optimizer, and the step (with --flexsp-compare-with's wrapper)."""
        cfg = self.cfg
        timeout = datetime.timedelta(minutes=cfg.distributed.timeout_minutes)
        rt = build_runtime(
            cfg.model,
            cfg.cost,
            device=self.device,
            sharding=cfg.flexsp.sharding,
            timeout=timeout,
            recompute=cfg.flexsp.recompute_config(),  # --recompute-*: fixed, or per plan group under auto
        )
        self.model, self.pool, self.executor = rt.model, rt.pool, rt.executor
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optimizer)
        self.run_step: StepRun = plain_step(self._timed_run)
        if self.baseline_cfg is not None:
            self.run_step = PairedBaseline(
                self._timed_run,
                lambda lengths: self.plan_now(lengths, self.baseline_cfg),
                self.model,
                self.optimizer,
                self.baseline_cfg.method,
            )
        m = cfg.model
        nparams = sum(p.numel() for p in self.model.parameters())  # DTensor numel is the global count
        log.info(
            "model: %.2fM parameters, %d layers, hidden %d, heads %d/%d, vocab %d, attention %s, sharding %s",
            nparams / 1e6,
            m.num_layers,
            m.hidden_size,
            m.num_attention_heads,
            m.num_query_groups,
            m.vocab_size,
            m.attention_backend,
            cfg.flexsp.sharding,
        )

    # ---------------------------------------------------------------- resume
    def resume(self) -> int:
        """Restore the checkpoint (if any) into model, optimizer, sampler and planner; the first iteration to run."""
        loaded = self.checkpointer.resume()  # every registered state is restored by it
        start = loaded.iteration if loaded is not None else 0
        self.data.sampler.next_batch = start
        return start

    def _resumable_state(self) -> StateRegistry:
        """Everything a resumed run needs to continue as an uninterrupted one would, registered once.

        The keys are the checkpoint format from before the registry (``extra.*`` in trainer.pt)."""
        reg = register_core(StateRegistry(), self.model, self.optimizer, self.scheduler)
        reg.register("sampler", self.data.sampler.state_dict, self.data.sampler.load_state_dict)
        reg.register("planner", self.hook.state_dict, self.hook.load_state_dict)
        reg.register("nonfinite", self.guard.state_dict, self.guard.load_state_dict, key=("extra", "nonfinite"))
        reg.register("calibration", self.calibration.state_dict, self._load_calibration, key=("extra", "calibration"))
        reg.register("iter_ms", lambda: list(self.iter_ms), self._load_iter_ms, key=("extra", "iter_ms"))
        return reg

    def _load_calibration(self, state: dict[str, Any]) -> None:
        calibrated = self.calibration.load_state_dict(state)
        if calibrated is not None:
            self.hook.update(cost=calibrated)

    def _load_iter_ms(self, state: list[float]) -> None:
        self.iter_ms = list(state)
        self._update_time_limit()

    def _write_calibrated(self) -> None:
        """--flexsp-save-calibrated: the cost model in force, at every checkpoint and at the end (rank 0)."""
        if self.cfg.flexsp.save_calibrated and self.env.rank == 0:
            self.calibration.save(self.cfg.flexsp.save_calibrated)
            log.info("wrote the calibrated cost model to %s", self.cfg.flexsp.save_calibrated)

    # -------------------------------------------------------------- planning
    def _update_time_limit(self) -> None:
        """--flexsp-time-limit auto: the planner's budget follows the measured iteration time."""
        if self.cfg.flexsp.time_limit_s is not None or not self.iter_ms:
            return
        limit = self.cfg.flexsp.auto_time_limit(float(np.median(self.iter_ms)))
        if abs(limit - self.hook.cfg.time_limit_s) > 0.1 * self.hook.cfg.time_limit_s:
            self.hook.update(time_limit_s=limit)

    def _after_step(self, plan: Plan, record: IterationRecord, gathered: list[float]) -> None:
        """Feed the planner what this step measured: calibration samples, the iteration time."""
        self.iter_ms = (self.iter_ms + [record.iter_ms])[-5:]
        self.rest_ms = (
            [] if self.rest_ms is None else (self.rest_ms + [max(0.0, record.iter_ms - record.compute_ms)])[-5:]
        )
        self._update_time_limit()
        if gathered:
            calibrated = self.calibration.ingest(plan, gathered)
            if calibrated is not None:
                self.hook.update(cost=calibrated)
        if self.env.rank == 0:
            record.extra.update(self.calibration.coefficients(), planner_time_limit_s=self.hook.cfg.time_limit_s)

    def _estimates(self, plan: Plan) -> tuple[float | None, float | None]:
        """The cost model's claims about this step: forward + backward (the model in force now, so a plan
        made ahead of a calibration is judged by what the planner knows when it runs), and the whole
        iteration (plus the median of the recent steps' time outside forward + backward: optimizer,
        gradient sync, plan wait and data, which no plan changes)."""
        if plan.estimated_time_ms is None:
            return None, None
        fwd_bwd = estimate_plan_ms(plan, self.hook.cost) if self.env.rank == 0 else plan.estimated_time_ms
        rest = float(np.median(self.rest_ms)) if self.rest_ms else None
        return fwd_bwd, (fwd_bwd + rest if rest is not None else None)

    def plan_now(self, lengths: list[int], cfg: PlannerConfig, *, fallback: bool = False) -> Plan:
        """Plan ``lengths`` on rank 0 right now and give every rank the same Plan (one JSON crossing)."""
        plan = plan_inline(lengths, self.hook.cost, cfg, fallback=fallback) if self.env.rank == 0 else None
        payload = broadcast_object(plan.to_dict() if plan is not None else None)
        return plan if plan is not None else Plan.from_dict(payload)

    def _timed_run(self, plan: Plan, seqs: list[torch.Tensor], **kw: Any) -> tuple[StepResult, float]:
        t0 = time.perf_counter()
        res = self.executor.run(plan, seqs, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return res, (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------------------ step
    def _batch(self, k: int) -> tuple[Plan, Any, list[torch.Tensor]]:
        """Batch ``k``'s plan (planned ahead on rank 0, broadcast), its planning info and its documents."""
        plan, info = self.hook.get_plan(k)
        indices = self.data.sampler.batch_indices(k)
        lengths = [int(x) for x in self.data.train.lengths[indices]]
        if plan.lengths != lengths:
            raise RuntimeError(
                f"iteration {k + 1}: the plan is for other lengths than the batch's (planner and "
                "sampler disagree); this is a bug"
            )
        return plan, info, self.data.sequences(self.data.train, indices)

    def _step_maxima(self, it: int, plan: Plan, result: StepResult, loss: float, gnorm: float) -> StepMaxima:
        """Timings, the non-finite verdict, the exit vote and calibration samples: every rank's maxima."""
        slots = self.calibration.local_slots(plan, result) if self.calibration.wants(it, plan) else []
        by_signal, by_deadline = self.exit.votes()
        return StepMaxima(
            compute_ms=_stat(result.stats, "fwd_ms", "bwd_ms"),
            a2a_ms=_stat(result.stats, "a2a_ms"),
            nonfinite=NonFiniteGuard.local_flag(loss, gnorm),
            exit_by_signal=by_signal,
            exit_by_deadline=by_deadline,
            calibration=list(slots),
        ).max_over_ranks(self.device)

    def train_step(self, k: int) -> IterationRecord:
        """Global batch ``k`` (0-based): plan, forward/backward, clip, optimizer step; the measured record."""
        it, t0 = k + 1, time.perf_counter()
        plan, info, seqs = self._batch(k)
        lr = self.scheduler.set_for_next_step()
        result, exec_ms, extra = self.run_step(k, plan, seqs)  # gradients are global sums afterwards
        # each parameter once: at TP > 1 the TP partitions' norms add up over the unit (issue 20)
        gnorm = tensor_parallel_grad_norm(self.model, self.cfg.optimizer.clip_grad, clip_grad_norm)
        loss = float(result.loss)
        maxima = self._step_maxima(it, plan, result, loss, gnorm)
        if self.guard.check(maxima.nonfinite > 0, it, loss, gnorm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            extra["skipped_step"] = True
        self.optimizer.zero_grad(set_to_none=True)
        self.data.sampler.next_batch = k + 1
        self.exit_vote = maxima.exit_vote
        # the paired baseline's step (--flexsp-compare-with) is not part of this mode's iteration
        iter_ms = (time.perf_counter() - t0) * 1e3 - float(extra.get("baseline_exec_ms", 0.0))
        extra.update(exec_ms=exec_ms, planner_cpu_s=info.cpu_s)
        estimated_ms, estimated_iter_ms = self._estimates(plan)
        record = IterationRecord(
            iteration=it,
            loss=loss,
            lr=lr,
            grad_norm=gnorm,
            tokens=sum(plan.lengths),
            iter_ms=iter_ms,
            estimated_ms=estimated_ms,
            estimated_iter_ms=estimated_iter_ms,
            micro_batches=plan.num_micro_batches,
            sp_mode=self.cfg.flexsp.sp_mode,
            groups_by_degree=plan.degree_histogram(),
            compute_ms=maxima.compute_ms,
            a2a_ms=maxima.a2a_ms,
            plan_source=info.source,
            plan_wait_ms=info.wait_ms,
            solve_time_s=info.solve_time_s,
            num_sequences=len(plan.lengths),
            extra=extra,
        )
        self._after_step(plan, record, maxima.calibration)
        return record

    # ------------------------------------------------------------ validation
    def should_validate(self, iteration: int) -> bool:
        return self.data.valid_sampler is not None and iteration % self.cfg.train.eval_interval == 0

    def evaluate(self) -> float:
        """Validation loss: token mean over the first --eval-iters validation batches (fallback plans, no update)."""
        tot_loss, tot_tokens = 0.0, 0
        for k in range(self.cfg.train.eval_iters):
            indices = self.data.valid_sampler.batch_indices(k)
            lengths = [int(x) for x in self.data.valid.lengths[indices]]
            plan = self.plan_now(lengths, self.planner_cfg, fallback=True)
            res = self.executor.run(plan, self.data.sequences(self.data.valid, indices), forward_only=True)
            tot_loss += float(res.loss) * sum(lengths)
            tot_tokens += sum(lengths)
        return tot_loss / tot_tokens

    # ----------------------------------------------------------------- train
    def _open_metrics(self, start: int) -> MetricsLogger:
        scalars = {k: v for k, v in self.cfg.run_record.items() if isinstance(v, (int, float, str, bool))}
        return MetricsLogger(
            self.cfg.logging,
            rank=self.env.rank,
            train_iters=self.cfg.train.train_iters,
            start_iteration=start,
            run_config=scalars,
        )

    def _log_summary(self, records: list[IterationRecord]) -> None:
        if self.env.rank != 0 or not records:
            return
        log.info("\n%s", format_summary(summarize([r.to_json() for r in records], self.cfg.flexsp.sp_mode)))
        c = self.hook.counters
        log.info(
            "plans: %d from the background planner, %d inline, %d fallback (late), %d fallback (error)",
            c.planner,
            c.inline,
            c.fallback_late,
            c.fallback_error,
        )

    def _start_watchdog(self) -> ProgressWatchdog:
        try:  # liveness beats go to the rendezvous store, so a silent rank can be named
            store = dist.PrefixStore("watchdog", dist.distributed_c10d._get_default_store())
        except (AttributeError, RuntimeError, ValueError):
            store = None
        # it fires before a blocked collective's own timeout, so the report names the silent ranks
        limit = WATCHDOG_SHARE_OF_TIMEOUT * 60.0 * self.cfg.distributed.timeout_minutes
        return ProgressWatchdog(limit, rank=self.env.rank, world_size=self.env.world_size, store=store)

    def train(self) -> list[IterationRecord]:
        """Resume, then step until --train-iters or an exit condition; save as the checkpointer decides."""
        start, iters = self.resume(), self.cfg.train.train_iters
        if start >= iters:  # a requeued or relaunched job that already finished: nothing to do, success
            log.info("the checkpoint is at iteration %d of --train-iters %d: training already finished", start, iters)
            return []
        self.metrics = self._open_metrics(start)
        self.watchdog = self._start_watchdog()
        stopped = False
        for k in range(start, iters):
            it = k + 1
            self.metrics.log(self.train_step(k))
            if self.should_validate(it):
                self.metrics.log_eval(it, self.evaluate())
            reason = self.exit.reason(self.exit_vote) if self.exit_vote else None
            self.checkpointer.poll()  # a background save that finished: its error surfaces here
            stopped = self.checkpointer.maybe_save(it, exit_reason=reason).stop
            self.watchdog.beat(it)
            if stopped:
                break
        if not stopped:
            self.checkpointer.finish(iters)
        self._write_calibrated()
        self.metrics.close()
        self._log_summary(self.metrics.records)
        return self.metrics.records

    def close(self) -> None:
        """Stop the watchdog, the signal handler and the background planner (the process group is main's)."""
        if self.watchdog is not None:
            self.watchdog.close()
        self.exit.close()
        self.hook.close()
