"""Per-iteration training logs: console line (or progress bar), metrics JSONL, TensorBoard, wandb.

Only rank 0 writes. The metrics file is the machine-readable record the comparison scripts
read: one JSON object per logged iteration with at least iteration, loss, lr, grad_norm,
tokens_per_s, iter_ms, estimated_ms, micro_batches and sp_mode.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import LoggingConfig

__all__ = ["IterationRecord", "MetricsLogger", "format_line", "setup_logging"]

log = logging.getLogger("flexsp.train")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings and errors (prefixed by their rank)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "[%(asctime)s] %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # per-dataset index chatter


@dataclass
class IterationRecord:
    """What one training iteration measured (same on every rank after the trainer's reductions)."""

    iteration: int  # 1-based: number of optimizer steps done
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    iter_ms: float
    estimated_ms: float | None
    micro_batches: int
    sp_mode: str
    groups_by_degree: dict[int, int] = field(default_factory=dict)
    a2a_ms: float = 0.0  # max over ranks of the all-to-all time
    compute_ms: float = 0.0  # max over ranks of forward+backward time
    plan_source: str = "planner"
    plan_wait_ms: float = 0.0
    solve_time_s: float = 0.0
    num_sequences: int = 0
    # the cost model's whole-iteration claim: estimated_ms (forward + backward) plus the step's other
    # parts (optimizer, gradient sync, plan wait, data) as recently measured; None until one was measured
    estimated_iter_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.iter_ms / 1e3) if self.iter_ms > 0 else 0.0

    @property
    def a2a_share(self) -> float:
        return self.a2a_ms / self.iter_ms if self.iter_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = {
            "iteration": self.iteration,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "iter_ms": self.iter_ms,
            "estimated_ms": self.estimated_ms,
            "estimated_iter_ms": self.estimated_iter_ms,
            "micro_batches": self.micro_batches,
            "sp_mode": self.sp_mode,
            "groups_by_degree": {str(k): v for k, v in sorted(self.groups_by_degree.items())},
            "a2a_ms": self.a2a_ms,
            "a2a_share": self.a2a_share,
            "compute_ms": self.compute_ms,
            "plan_source": self.plan_source,
            "plan_wait_ms": self.plan_wait_ms,
            "solve_time_s": self.solve_time_s,
            "num_sequences": self.num_sequences,
        }
        d.update(self.extra)
        return d


def format_line(r: IterationRecord, train_iters: int) -> str:
    """Megatron-like console line."""
    groups = " ".join(f"d{d}x{n}" for d, n in sorted(r.groups_by_degree.items()))
    est = f"{r.estimated_iter_ms or r.estimated_ms:.1f}" if r.estimated_ms is not None else "-"
    src = "" if r.plan_source in ("planner", "inline") else f" | plan {r.plan_source}"
    if r.extra.get("baseline_exec_ms") and r.extra.get("exec_ms"):
        src += f" | step {r.extra['exec_ms']:.0f} ms vs {r.extra['baseline_mode']} {r.extra['baseline_exec_ms']:.0f} ms"
    return (
        f" iteration {r.iteration:>6}/{train_iters} | loss {r.loss:.5f} | lr {r.lr:.3E} | "
        f"grad norm {r.grad_norm:.3f} | tokens/s {r.tokens_per_s:,.0f} | ms/iter {r.iter_ms:.1f} | "
        f"est ms {est} | micro-batches {r.micro_batches} | groups {groups} | a2a {100 * r.a2a_share:.1f}%"
        f"{src}"
    )


class MetricsLogger:
    """Writes every ``log_interval``-th record to the console/progress bar, JSONL, TensorBoard, wandb."""

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        rank: int,
        train_iters: int,
        start_iteration: int = 0,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.train_iters = train_iters
        self.records: list[IterationRecord] = []
        self._tb = None
        self._wandb = None
        self._bar = None
        if rank != 0:
            return
        if cfg.metrics_file:
            Path(cfg.metrics_file).parent.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard_dir:
            self._tb = self._open_tensorboard(cfg.tensorboard_dir)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb-project: the wandb package is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, config=run_config or {})
        if cfg.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=train_iters, initial=start_iteration, unit="it", dynamic_ncols=True)

    @staticmethod
    def _open_tensorboard(path: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(
                "--tensorboard-dir: the tensorboard package is not installed (pip install tensorboard)"
            ) from None
        os.makedirs(path, exist_ok=True)
        return SummaryWriter(log_dir=path)

    def log(self, r: IterationRecord) -> None:
        """Record every iteration (for the summary); write out the logged ones."""
        if self.rank != 0:
            return
        self.records.append(r)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{r.loss:.4f}", tok_s=f"{r.tokens_per_s:,.0f}", ms=f"{r.iter_ms:.0f}")
        if r.iteration % self.cfg.log_interval and r.iteration != self.train_iters:
            return
        if self._bar is not None:
            self._bar.write(format_line(r, self.train_iters))
        else:
            log.info(format_line(r, self.train_iters))
        if self.cfg.metrics_file:
            with open(self.cfg.metrics_file, "a") as f:
                f.write(json.dumps(r.to_json()) + "\n")
        scalars = {
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": r.tokens_per_s,
            "iter_ms": r.iter_ms,
            "micro_batches": r.micro_batches,
            "a2a_share": r.a2a_share,
        }
        if r.estimated_ms is not None:
            scalars["estimated_ms"] = r.estimated_ms
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, r.iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=r.iteration)

    def log_eval(self, iteration: int, loss: float) -> None:
        if self.rank != 0:
            return
        msg = f" validation at iteration {iteration} | loss {loss:.5f}"
        (self._bar.write if self._bar is not None else log.info)(msg)
        if self.cfg.metrics_file:
            with open(self.cfg.metrics_file, "a") as f:
                f.write(json.dumps({"iteration": iteration, "valid_loss": loss}) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("valid/loss", loss, iteration)
        if self._wandb is not None:
            self._wandb.log({"valid/loss": loss}, step=iteration)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
