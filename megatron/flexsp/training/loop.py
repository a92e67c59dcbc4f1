"""The training loop of pretrain_gpt_flexsp.py: set-up in dependency order, then iterate.

Set-up: launch environment (torchrun or SLURM) -> argument validation (before any work) ->
torch.distributed + megatron parallel_state -> datasets and sampler -> planner hook ->
model, sharding, SP group pool, executor -> optimizer -> optional resume. Iteration k:
plan of batch k (planned ahead on rank 0, broadcast) -> the batch's documents -> executor
(forward/backward of every micro-batch of the plan) -> global-norm clip -> AdamW step ->
metrics, checkpoints. Every sp-mode uses this same loop and the same batches in the same
order; only the plan differs.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from . import arguments as A
from .checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from .logging_utils import IterationRecord, MetricsLogger, setup_logging
from .optimizer import build_optimizer, clip_grad_norm
from .planner_hook import PlannerHook
from .summary import format_summary, summarize

__all__ = ["LaunchEnv", "launch_env", "main", "train"]

log = logging.getLogger("flexsp.train")


# ------------------------------------------------------------------------- launch env

@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    raise A.ArgumentError("launched by SLURM without MASTER_ADDR, and the first node of SLURM_JOB_NODELIST could "
                          "not be resolved (no scontrol?): export MASTER_ADDR and MASTER_PORT")


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank and rendezvous from torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), else SLURM, else 1 process."""
    e = os.environ if environ is None else environ

    def num(key: str) -> int:
        try:
            return int(e[key])
        except ValueError:
            raise A.ArgumentError(f"environment variable {key}={e[key]!r} is not an integer") from None

    if "RANK" in e and "WORLD_SIZE" in e:
        rank, ws = num("RANK"), num("WORLD_SIZE")
        local = num("LOCAL_RANK") if "LOCAL_RANK" in e else rank
        lws = num("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in e else ws
    elif "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        rank, ws = num("SLURM_PROCID"), num("SLURM_NTASKS")
        local = num("SLURM_LOCALID") if "SLURM_LOCALID" in e else 0
        lws = num("SLURM_NTASKS_PER_NODE") if e.get("SLURM_NTASKS_PER_NODE", "").isdigit() else \
            max(1, ws // max(1, int(e.get("SLURM_NNODES", "1") or 1)))
    else:
        rank, ws, local, lws = 0, 1, 0, 1
    if not 0 <= rank < ws:
        raise A.ArgumentError(f"rank {rank} is outside world size {ws} (check RANK/WORLD_SIZE)")
    addr = e.get("MASTER_ADDR")
    if addr is None:
        addr = "127.0.0.1" if ws == 1 else (_slurm_master() if "SLURM_PROCID" in e else None)
        if addr is None:
            raise A.ArgumentError(f"world size {ws} but MASTER_ADDR is not set: launch with torchrun or srun")
    port = num("MASTER_PORT") if "MASTER_PORT" in e else (_free_port() if ws == 1 else 29500)
    return LaunchEnv(rank, ws, local, lws, addr, port)


# ------------------------------------------------------------------------------ setup

def _has_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def shutdown_distributed() -> None:
    """Destroy the default process group if one is up; a failure here must not mask the real error."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def init_distributed(env: LaunchEnv, backend: str | None, timeout_s: float = 1800.0) -> torch.device:
    """Process group on the chosen backend, one device per rank, megatron parallel_state (tp=pp=cp=1)."""
    cuda = _has_cuda()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ or env.local_world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))
    if not dist.is_initialized():
        kw: dict[str, Any] = {}
        if cuda and backend == "nccl":
            kw["device_id"] = device
        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    from flexsp_patches import cpu_compat, parallel_state

    parallel_state.install()
    return device


def _data_config(args, vocab_size: int):
    from megatron.flexsp.data.build import DataConfig
    from megatron.flexsp.data.mock import MockConfig

    mock = MockConfig(num_documents=args.mock_data_num_docs, max_len=args.mock_data_max_len,
                      median=args.mock_data_median, sigma=args.mock_data_sigma, tail_frac=args.mock_data_tail_frac,
                      pareto_alpha=args.mock_data_pareto_alpha, min_len=args.mock_data_min_len)
    return DataConfig(seq_length=args.seq_length, data_path=list(args.data_path or []), split=args.split,
                      overlong=args.overlong, mock=bool(args.mock_data), mock_config=mock,
                      stdlib_corpus=not args.mock_data and not args.data_path,
                      stdlib_granularity=args.stdlib_granularity, vocab_size=vocab_size, seed=args.seed)


def _vocab_size(args) -> int:
    """--vocab-size, else the tokenizer's; the byte-level tokenizer for the built-in corpus and mock data."""
    from megatron.flexsp.data.tokenizer import BYTE_VOCAB_SIZE, build_tokenizer

    tok_vocab = None
    if args.tokenizer_type:
        tok_vocab = int(build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size)
    elif not args.data_path:
        tok_vocab = BYTE_VOCAB_SIZE
    if args.vocab_size is None:
        if tok_vocab is None:
            raise A.ArgumentError("--data-path without --tokenizer-type: give --vocab-size (or the tokenizer the "
                                  "data was preprocessed with)")
        return tok_vocab
    if tok_vocab is not None and args.vocab_size < tok_vocab:
        raise A.ArgumentError(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's vocabulary {tok_vocab}")
    return int(args.vocab_size)


def _attention_backend(requested: str, cuda: bool) -> str:
    if requested != "auto":
        return requested
    if cuda:
        if A._installed("transformer_engine"):
            return "te"
        if A._installed("flash_attn"):
            return "flash"
    return "sdpa"


def _batch_sequences(dataset, indices) -> list[torch.Tensor]:
    return [torch.from_numpy(dataset[int(i)].astype("int64", copy=False)) for i in indices]


def _bcast_obj(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stat(stats: dict[str, Any], *keys: str) -> float:
    return float(sum(float(stats.get(k, 0.0) or 0.0) for k in keys))


# ------------------------------------------------------------------------------ train

def train(args, env: LaunchEnv) -> list[IterationRecord]:
    """Run the whole job on this rank; returns rank 0's records (empty list elsewhere)."""
    from megatron.flexsp.data.build import build_datasets
    from megatron.flexsp.data.sampler import GlobalBatchSampler
    from megatron.flexsp.runtime.executor import FlexSPExecutor
    from megatron.flexsp.runtime.group_pool import GroupPool
    from megatron.flexsp.runtime.model import build_gpt_model
    from megatron.flexsp.runtime.sharding import shard_model

    cuda = _has_cuda()
    cost = A.resolve_cost_model(args, env.world_size, cuda)
    A.validate_args(args, env.world_size, has_cuda=cuda, cost=cost)
    vocab = _vocab_size(args)
    args.attention_backend = _attention_backend(args.attention_backend, cuda)
    cfgs = A.build_configs(args)
    data_cfg = _data_config(args, vocab)
    try:
        data_cfg.validate()
    except ValueError as e:
        raise A.ArgumentError(f"data: {e}") from None

    device = init_distributed(env, args.distributed_backend)
    setup_logging(env.rank)
    from flexsp_patches import cpu_compat

    cpu_compat.init_model_parallel(args.seed)
    torch.manual_seed(args.seed)
    import numpy as np
    import random

    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    log.info("FlexSP-Megatron: %d ranks (%s, %s), sp-mode %s, cost model '%s'", env.world_size,
             dist.get_backend(), device.type, args.sp_mode, cost.name)
    if args.micro_batch_size is not None:
        log.warning("--micro-batch-size %d is ignored: the planner chooses the micro-batches of every global batch",
                    args.micro_batch_size)

    # ---- data (rank 0 first: it may build and cache the embedded corpus); errors reach every rank
    def build():
        try:
            tr, va = build_datasets(data_cfg)
            return tr, va, GlobalBatchSampler(tr.lengths, args.global_batch_size, args.seed), None
        except (ValueError, OSError) as e:
            return None, None, None, f"data: {e}"

    if env.rank == 0:
        train_ds, valid_ds, sampler, err = build()
    err = _bcast_obj(err if env.rank == 0 else None)
    if err:
        raise A.ArgumentError(err)
    if env.rank != 0:
        train_ds, valid_ds, sampler, err = build()
        if err:
            raise A.ArgumentError(err)
    stats = getattr(train_ds, "stats", None)
    log.info("train documents: %d%s", len(train_ds),
             f" ({stats.to_dict() if hasattr(stats, 'to_dict') else stats})" if stats is not None else "")
    valid_sampler = None
    if valid_ds is not None and len(valid_ds) >= args.global_batch_size and args.eval_interval:
        valid_sampler = GlobalBatchSampler(valid_ds.lengths, args.global_batch_size, args.seed, shuffle=False)
    elif args.eval_interval:
        log.warning("--eval-interval %d: the validation split has %d documents, fewer than one global batch of %d; "
                    "no validation (raise the valid share of --split)", args.eval_interval,
                    0 if valid_ds is None else len(valid_ds), args.global_batch_size)

    # ---- planner hook (rank 0 plans ahead; every rank gets the plan by broadcast)
    pcfg = dict(world_size=env.world_size, method=args.sp_mode, time_limit_s=args.flexsp_time_limit,
                max_seq_len=args.seq_length, static_degree=args.context_parallel_size if args.sp_mode == "static"
                else None, seed=args.seed)
    cmp_cfg = None
    if args.flexsp_compare_with:
        cmp_cfg = dict(pcfg, method=args.flexsp_compare_with,
                       static_degree=args.context_parallel_size if args.flexsp_compare_with == "static" else None)
    hook = PlannerHook(cost, pcfg, sampler.batch_lengths if env.rank == 0 else None,
                       plan_ahead=args.flexsp_plan_ahead, rank=env.rank, dump_dir=args.flexsp_dump_plans,
                       max_iterations=args.train_iters)
    try:
        # ---- model, sharding, SP groups, executor, optimizer
        gpt_cfg = cfgs.model.to_gpt_config(vocab)
        model = build_gpt_model(gpt_cfg, device=device)
        shard_model(model, args.flexsp_sharding)
        pool = GroupPool.from_cost_model(cost, env.world_size)
        executor = FlexSPExecutor(model, pool, sharding_mode=args.flexsp_sharding)
        optimizer, scheduler = build_optimizer(model, cfgs.optimizer)
        nparams = sum(p.numel() for p in model.parameters())  # DTensor numel is the global count
        log.info("model: %.2fM parameters, %d layers, hidden %d, heads %d/%d, vocab %d, attention %s, sharding %s",
                 nparams / 1e6, args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups,
                 vocab, args.attention_backend, args.flexsp_sharding)

        start = 0
        fresh = (args.load and args.save and os.path.realpath(args.load) == os.path.realpath(args.save)
                 and not os.path.exists(os.path.join(args.load, "latest")))
        if fresh:  # Megatron's auto-resume pattern (--save X --load X): the first launch starts from scratch
            log.info("no checkpoint in %s yet: starting from scratch", args.load)
        elif args.load:
            loaded = load_checkpoint(args.load, model, optimizer, scheduler)
            if loaded.sampler is not None:
                sampler.load_state_dict(loaded.sampler)
            if loaded.planner is not None:
                hook.load_state_dict(loaded.planner)
            start = loaded.iteration
            log.info("resumed from %s at iteration %d", loaded.path, start)
            if start >= args.train_iters:
                raise CheckpointError(f"checkpoint {loaded.path} is at iteration {start}, not below --train-iters "
                                      f"{args.train_iters}: nothing to train")
        sampler.next_batch = start

        logger = MetricsLogger(cfgs.logging, rank=env.rank, train_iters=args.train_iters, start_iteration=start,
                               run_config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        arg_record = {k: v for k, v in vars(args).items()}

        def save(iteration: int) -> None:
            path = save_checkpoint(args.save, iteration, model, optimizer, scheduler,
                                   sampler_state=sampler.state_dict(), planner_state=hook.state_dict(),
                                   args=arg_record)
            log.info("saved checkpoint %s", path)

        last_saved = start
        for k in range(start, args.train_iters):
            it = k + 1
            t0 = time.perf_counter()
            plan, info = hook.get_plan(k)
            indices = sampler.batch_indices(k)
            lengths = [int(x) for x in train_ds.lengths[indices]]
            if plan.lengths != lengths:
                raise RuntimeError(f"iteration {it}: the plan is for other lengths than the batch's (planner and "
                                   "sampler disagree); this is a bug")
            seqs = _batch_sequences(train_ds, indices)
            lr = scheduler.set_for_next_step()
            extra: dict[str, Any] = {}
            baseline_first = cmp_cfg is not None and k % 2 == 0  # alternate: both orders equally often
            if baseline_first:
                extra = _run_baseline(executor, optimizer, cost, cmp_cfg, lengths, seqs, device)
            t_exec = time.perf_counter()
            result = executor.run(plan, seqs)  # gradients are global sums afterwards (fsdp2 and ddp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            exec_ms = (time.perf_counter() - t_exec) * 1e3
            if cmp_cfg is not None and not baseline_first:
                stash = [(p, p.grad) for p in model.parameters()]
                for p_, _ in stash:
                    p_.grad = None
                extra = _run_baseline(executor, optimizer, cost, cmp_cfg, lengths, seqs, device)
                for p_, g in stash:
                    p_.grad = g
                del stash
            if extra:
                extra["baseline_first"] = baseline_first
            gnorm = clip_grad_norm(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            sampler.next_batch = k + 1
            loss = float(result.loss)
            st = getattr(result, "stats", {}) or {}
            t = torch.tensor([_stat(st, "fwd_ms", "bwd_ms"), _stat(st, "a2a_ms")], dtype=torch.float64)
            t = t.to(device) if device.type == "cuda" else t
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if device.type == "cuda":
                torch.cuda.synchronize()
            # the paired baseline's step (--flexsp-compare-with) is not part of this mode's iteration
            iter_ms = (time.perf_counter() - t0) * 1e3 - float(extra.get("baseline_exec_ms", 0.0))
            if not np.isfinite(loss):
                raise FloatingPointError(f"iteration {it}: loss is {loss} (lower --lr or check the data)")
            rec = IterationRecord(
                iteration=it, loss=loss, lr=lr, grad_norm=gnorm, tokens=sum(lengths), iter_ms=iter_ms,
                estimated_ms=plan.estimated_time_ms, micro_batches=plan.num_micro_batches, sp_mode=args.sp_mode,
                groups_by_degree=plan.degree_histogram(), compute_ms=float(t[0]), a2a_ms=float(t[1]),
                plan_source=info.source, plan_wait_ms=info.wait_ms, solve_time_s=info.solve_time_s,
                num_sequences=len(lengths), extra=dict(extra, exec_ms=exec_ms),
            )
            logger.log(rec)
            if valid_sampler is not None and it % args.eval_interval == 0:
                logger.log_eval(it, evaluate(executor, optimizer, cost, pcfg, valid_ds, valid_sampler,
                                             args.eval_iters))
            if args.save and args.save_interval and it % args.save_interval == 0:
                save(it)
                last_saved = it
            if args.exit_interval and it % args.exit_interval == 0:
                if args.save and last_saved != it:
                    save(it)
                    last_saved = it
                log.info("exiting after iteration %d (--exit-interval %d)", it, args.exit_interval)
                break
        else:
            if args.save and not args.no_save_final and last_saved != args.train_iters:
                save(args.train_iters)
        logger.close()
        if env.rank == 0 and logger.records:
            log.info("\n%s", format_summary(summarize([r.to_json() for r in logger.records], args.sp_mode)))
            c = hook.counters
            log.info("plans: %d from the background planner, %d inline, %d fallback (late), %d fallback (error)",
                     c.planner, c.inline, c.fallback_late, c.fallback_error)
        return logger.records
    finally:
        hook.close()


def _run_baseline(executor, optimizer, cost, cfg: dict[str, Any], lengths, seqs, device) -> dict[str, Any]:
    """Execute the baseline's plan of this batch and time it; its gradients are dropped (the caller
    stashes the real step's gradients when the baseline runs second)."""
    from megatron.flexsp.planner.plan import Plan

    from .planner_hook import broadcast_plan, plan_inline

    d = plan_inline(lengths, cost, cfg).to_dict() if dist.get_rank() == 0 else None
    plan = Plan.from_dict(broadcast_plan(d))
    t0 = time.perf_counter()
    res = executor.run(plan, seqs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    optimizer.zero_grad(set_to_none=True)
    return {"baseline_mode": cfg["method"], "baseline_exec_ms": ms, "baseline_loss": float(res.loss),
            "baseline_estimated_ms": plan.estimated_time_ms, "baseline_micro_batches": plan.num_micro_batches}


def evaluate(executor, optimizer, cost, pcfg: dict[str, Any], dataset, sampler, iters: int) -> float:
    """Validation loss: token mean over the first ``iters`` validation batches (fallback plans, no update).

    Uses the executor's forward-only mode when it has one; otherwise runs forward and backward
    and drops the gradients (correct, slower).
    """
    import inspect

    from megatron.flexsp.planner.plan import Plan

    from .planner_hook import broadcast_plan, plan_inline

    fwd_only = "forward_only" in inspect.signature(executor.run).parameters
    tot_loss, tot_tokens = 0.0, 0
    for k in range(iters):
        indices = sampler.batch_indices(k)
        lengths = [int(x) for x in dataset.lengths[indices]]
        d = plan_inline(lengths, cost, pcfg, fallback=True).to_dict() if dist.get_rank() == 0 else None
        plan = Plan.from_dict(broadcast_plan(d))
        seqs = _batch_sequences(dataset, indices)
        res = executor.run(plan, seqs, forward_only=True) if fwd_only else executor.run(plan, seqs)
        if not fwd_only:
            optimizer.zero_grad(set_to_none=True)
        tot_loss += float(res.loss) * sum(lengths)
        tot_tokens += sum(lengths)
    return tot_loss / tot_tokens


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, validate, train; a clear one-line error (exit code 2) for bad settings."""
    import sys
    import warnings

    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated"):  # megatron.core's CPU-only notices, not actionable here
        warnings.filterwarnings("ignore", message=msg)
    args = A.parse_args(argv)
    try:
        env = launch_env()
        if args.flexsp_profile:
            from .profiler import profile

            profile(args, env)
            return 0
        train(args, env)
    except (A.ArgumentError, CheckpointError) as e:
        print(f"pretrain_gpt_flexsp.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown_distributed()
    return 0
