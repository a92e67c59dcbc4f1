# shellcheck shell=bash
# Sourced by the FlexSP SLURM job scripts: finds the repository and Python, and launches a
# Python program on every rank of the allocation in one of two ways:
#
#   FLEXSP_LAUNCHER=torchrun (default)  one srun task per node, each running torchrun with a
#       c10d rendezvous on the first node of the job (elastic agent, per-node process spawn);
#       request `--ntasks-per-node=1 --cpus-per-task=<all cores>` and GPUs per node.
#   FLEXSP_LAUNCHER=srun                one srun task per GPU; RANK / WORLD_SIZE / LOCAL_RANK /
#       LOCAL_WORLD_SIZE are set from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
#       SLURM_NTASKS_PER_NODE, MASTER_ADDR is the first node; request `--ntasks-per-node=<GPUs>`.
#
# Either way the program sees torchrun's environment (env:// init), so the trainer needs one
# code path. Variables read (all optional):
#   FLEXSP_ROOT        repository root (default: the submit directory; submit from the repo root)
#   FLEXSP_PYTHON      interpreter (default: $FLEXSP_ROOT/.venv/bin/python, else python3)
#   GPUS_PER_NODE      processes per node for torchrun (default: SLURM_GPUS_ON_NODE, else
#                      SLURM_NTASKS_PER_NODE, else 1)
#   MASTER_PORT        rendezvous / store port (default: 20000 + job id mod 20000)
#   FLEXSP_RUN_DIR     where logs, metrics, plans and checkpoints go (default: runs/slurm-<job id>;
#                      a requeued job keeps its id, so it finds its checkpoints there)
#   CHECKPOINT_DIR     --save/--load of a training run (default: $FLEXSP_RUN_DIR/checkpoints;
#                      each sp-mode in its own subdirectory; "none": no checkpoints)
#   SAVE_INTERVAL      --save-interval (default: the trainer's: at the end and on a signal)
#   MAX_RESTARTS       torchrun --max-restarts: in-job restarts after a failed rank (default 0)
#   FLEXSP_SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks to save and exit after a
#                      forwarded signal before SIGKILL (default 80, below the 90 s of --signal)
#   FLEXSP_REQUEUE_ON_SIGNAL  1 (default): after the time-limit signal (SIGUSR1, see the
#                      sbatch files' --signal=B:USR1@90) the ranks save and exit, then the job
#                      is requeued (scontrol requeue) and resumes from its checkpoint
#   FLEXSP_DRY_RUN=1   print the srun line instead of running it

set -euo pipefail

flexsp_die() { echo "flexsp-slurm: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || flexsp_die "not inside a SLURM allocation (submit with sbatch, or run under salloc)"

FLEXSP_ROOT=${FLEXSP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$FLEXSP_ROOT/scripts/slurm/common.sh" ] \
  || flexsp_die "FLEXSP_ROOT=$FLEXSP_ROOT is not the FlexSP-Megatron repository (submit from its root or set FLEXSP_ROOT)"
if [ -z "${FLEXSP_PYTHON:-}" ]; then
  if [ -x "$FLEXSP_ROOT/.venv/bin/python" ]; then FLEXSP_PYTHON=$FLEXSP_ROOT/.venv/bin/python; else FLEXSP_PYTHON=python3; fi
fi
command -v "$FLEXSP_PYTHON" >/dev/null || flexsp_die "python interpreter '$FLEXSP_PYTHON' not found (set FLEXSP_PYTHON)"

FLEXSP_LAUNCHER=${FLEXSP_LAUNCHER:-torchrun}
FLEXSP_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
# The first node's address as SLURM itself reaches it (NodeAddr; the node name when unset).
_first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)
_first_addr=$(scontrol show node "$_first_node" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-${_first_addr:-$_first_node}}
[ -n "$MASTER_ADDR" ] || flexsp_die "cannot resolve the first node of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' (scontrol failed): export MASTER_ADDR"
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
_per_node=${SLURM_NTASKS_PER_NODE:-}
_per_node=${_per_node%%(*}  # "4(x2)" -> "4"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${_per_node:-1}}}
FLEXSP_RUN_DIR=${FLEXSP_RUN_DIR:-$FLEXSP_ROOT/runs/slurm-$SLURM_JOB_ID}
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || flexsp_die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"
FLEXSP_SHUTDOWN_TIMEOUT=${FLEXSP_SHUTDOWN_TIMEOUT:-80}
[[ $FLEXSP_SHUTDOWN_TIMEOUT =~ ^[0-9]+$ ]] \
  || flexsp_die "FLEXSP_SHUTDOWN_TIMEOUT must be a non-negative integer (seconds), got '$FLEXSP_SHUTDOWN_TIMEOUT'"
mkdir -p "$FLEXSP_RUN_DIR"
export FLEXSP_ROOT FLEXSP_PYTHON MASTER_ADDR MASTER_PORT GPUS_PER_NODE FLEXSP_RUN_DIR
export PYTHONPATH=$FLEXSP_ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$FLEXSP_ROOT"

flexsp_print() { printf 'flexsp-slurm: dry run: srun'; printf ' %q' "$@"; echo; }

# The job step runs in the background so the batch shell can take SLURM's time-limit signal
# (#SBATCH --signal=B:USR1@90 signals only this shell) and forward it to srun, which forwards it
# to every task; the trainer (--exit-signal-handler --exit-signal SIGUSR1) saves and exits. A
# signalled job is then requeued (#SBATCH --requeue; same job id, same run directory) and resumes.
_flexsp_step_pid=""
_flexsp_signalled=0
_flexsp_on_signal() {
  _flexsp_signalled=1
  echo "flexsp-slurm: SIGUSR1 (time limit near): asking the ranks to save a checkpoint and exit"
  if [ -n "$_flexsp_step_pid" ]; then kill -USR1 "$_flexsp_step_pid" 2>/dev/null || true; fi
}

trap _flexsp_on_signal USR1  # for the whole job script: a signal between two steps must not kill it

_flexsp_requeue_and_exit() {
  if [ "${FLEXSP_REQUEUE_ON_SIGNAL:-1}" = 1 ]; then
    echo "flexsp-slurm: requeueing job $SLURM_JOB_ID: it resumes from its latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || flexsp_die "scontrol requeue $SLURM_JOB_ID failed (submit with --requeue)"
  fi
  exit 0  # nothing else of this job script runs in this allocation
}

# flexsp_run_step COMMAND...: run a job step in the background, forwarding SIGUSR1; its exit status.
flexsp_run_step() {
  local rc=0
  if [ "$_flexsp_signalled" = 1 ]; then _flexsp_requeue_and_exit; fi  # signalled between steps
  "$@" &
  _flexsp_step_pid=$!
  while :; do
    rc=0
    wait "$_flexsp_step_pid" || rc=$?
    kill -0 "$_flexsp_step_pid" 2>/dev/null || break  # still running: wait was cut short by the signal
  done
  _flexsp_step_pid=""
  if [ "$_flexsp_signalled" = 1 ]; then
    echo "flexsp-slurm: job step ended with status $rc after the time-limit signal"
    _flexsp_requeue_and_exit
  fi
  return "$rc"
}

# flexsp_launch PROGRAM.py ARGS...   or   flexsp_launch -m MODULE ARGS...
flexsp_launch() {
  [ $# -ge 1 ] || flexsp_die "flexsp_launch: no program given"
  local srun=(flexsp_run_step srun)
  if [ "${FLEXSP_DRY_RUN:-0}" = 1 ]; then  # print the launch line instead of running it
    srun=(flexsp_print)
  fi
  case "$FLEXSP_LAUNCHER" in
    torchrun)
      echo "flexsp-slurm: torchrun on $FLEXSP_NNODES node(s) x $GPUS_PER_NODE process(es), rendezvous c10d at $MASTER_ADDR:$MASTER_PORT"
      # The per-task SLURM rank variables are dropped so torchrun's RANK/WORLD_SIZE are the only ones.
      # torchrun forwards SIGUSR1 to its workers (PET_SIGNALS_TO_HANDLE, torch >= 2.9; older ones die on
      # it: use FLEXSP_LAUNCHER=srun there) and gives them FLEXSP_SHUTDOWN_TIMEOUT s to save and exit.
      "${srun[@]}" --nodes="$FLEXSP_NNODES" --ntasks="$FLEXSP_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        env -u SLURM_PROCID -u SLURM_LOCALID -u SLURM_NTASKS -u SLURM_NPROCS \
        PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$FLEXSP_SHUTDOWN_TIMEOUT" \
        "$FLEXSP_PYTHON" -m torch.distributed.run \
          --nnodes="$FLEXSP_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
          --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
          --max-restarts="$MAX_RESTARTS" "$@"
      ;;
    srun)
      local ntasks=${SLURM_NTASKS:-$((FLEXSP_NNODES * GPUS_PER_NODE))}
      echo "flexsp-slurm: srun with $ntasks task(s), one per rank, store at $MASTER_ADDR:$MASTER_PORT"
      # shellcheck disable=SC2016  # expanded by each task, not here
      "${srun[@]}" --ntasks="$ntasks" --kill-on-bad-exit=1 bash -c '
        export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
        _n=${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}; export LOCAL_WORLD_SIZE=${_n%%(*}
        exec "$@"' flexsp-rank "$FLEXSP_PYTHON" "$@"
      ;;
    *) flexsp_die "FLEXSP_LAUNCHER must be 'torchrun' or 'srun', got '$FLEXSP_LAUNCHER'" ;;
  esac
}

# Model / data / training presets. Every array can be replaced by the user before sourcing
# train.sh (or extended by passing flags to the job script: they are appended last and win).
#   FLEXSP_PRESET=gpu-7b    Llama-like 7B, 64K documents, TE attention, bf16, NCCL
#   FLEXSP_PRESET=cpu-tiny  2-layer GPT on gloo, stdlib corpus / mock long-tail data
flexsp_preset_args() {
  case "${FLEXSP_PRESET:-gpu-7b}" in
    gpu-7b)
      FLEXSP_MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
        --group-query-attention --num-query-groups 8 --position-embedding-type rope --normalization RMSNorm --swiglu
        --seq-length "${SEQ_LENGTH:-65536}" --max-position-embeddings "${SEQ_LENGTH:-65536}"
        --bf16 --transformer-impl transformer_engine --distributed-backend nccl)
      if [ -n "${DATA_PATH:-}" ]; then
        read -r -a _data_path <<< "$DATA_PATH"  # "W1 PREFIX1 W2 PREFIX2 ..." as Megatron takes it
        # shellcheck disable=SC2054  # "99,1,0" is one argument
        FLEXSP_DATA_ARGS=(--data-path "${_data_path[@]}" --tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}"
          --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL with DATA_PATH}" --split 99,1,0)
      else
        FLEXSP_DATA_ARGS=(--mock-data --vocab-size 32000)
      fi
      FLEXSP_TRAIN_ARGS=(--global-batch-size "${GLOBAL_BATCH_SIZE:-64}" --train-iters "${TRAIN_ITERS:-100}"
        --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
        --log-interval 1)
      FLEXSP_DEFAULT_COST_MODEL=""  # best: profile first (scripts/slurm/profile.sbatch); else the analytic prior
      ;;
    cpu-tiny)
      FLEXSP_MODEL_ARGS=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention
        --num-query-groups 2 --position-embedding-type rope --normalization RMSNorm --swiglu
        --seq-length "${SEQ_LENGTH:-1024}" --max-position-embeddings "${SEQ_LENGTH:-1024}"
        --distributed-backend gloo)
      FLEXSP_DATA_ARGS=(--mock-data)
      FLEXSP_TRAIN_ARGS=(--global-batch-size "${GLOBAL_BATCH_SIZE:-16}" --train-iters "${TRAIN_ITERS:-3}"
        --lr 1e-3 --log-interval 1)
      FLEXSP_DEFAULT_COST_MODEL=cpu-tiny
      ;;
    *) flexsp_die "unknown FLEXSP_PRESET '${FLEXSP_PRESET}' (gpu-7b, cpu-tiny)" ;;
  esac
}

# flexsp_train SP_MODE [EXTRA TRAINER FLAGS...]: one training run, metrics in the run directory.
flexsp_train() {
  local mode=${1:?sp-mode}; shift
  flexsp_preset_args
  local cost=${COST_MODEL:-$FLEXSP_DEFAULT_COST_MODEL}
  local costarg=()
  if [ -n "$cost" ]; then
    costarg=(--flexsp-cost-model "$cost")
  else  # no profile yet: the trainer starts from its analytic prior and calibrates it online
    echo "flexsp-slurm: no COST_MODEL: the run starts from the analytic cost model and calibrates it while training (a profile is better: sbatch scripts/slurm/profile.sbatch, then COST_MODEL=runs/slurm-<job>/cost_model.json)"
  fi
  local cp=()
  # static = vanilla Megatron CP / Ulysses: its degree from CONTEXT_PARALLEL_SIZE, else the planner
  # picks the smallest degree that holds --seq-length.
  if [ "$mode" = static ] && [ -n "${CONTEXT_PARALLEL_SIZE:-}" ]; then cp=(--context-parallel-size "$CONTEXT_PARALLEL_SIZE"); fi
  # Checkpoints in the run directory (Megatron's auto-resume: --save X --load X), so a requeued or
  # restarted job resumes; SIGUSR1 (the sbatch files' time-limit signal) makes the ranks save and exit.
  local ckpt=() where=""
  local ckpt_dir=${CHECKPOINT_DIR:-$FLEXSP_RUN_DIR/checkpoints}
  if [ "$ckpt_dir" != none ]; then
    ckpt=(--save "$ckpt_dir/$mode" --load "$ckpt_dir/$mode" --exit-signal-handler --exit-signal SIGUSR1)
    if [ -n "${SAVE_INTERVAL:-}" ]; then ckpt+=(--save-interval "$SAVE_INTERVAL"); fi
    where=", checkpoints $ckpt_dir/$mode"
  fi
  echo "flexsp-slurm: sp-mode $mode, run directory $FLEXSP_RUN_DIR$where"
  flexsp_launch "$FLEXSP_ROOT/pretrain_gpt_flexsp.py" \
    "${FLEXSP_MODEL_ARGS[@]}" "${FLEXSP_DATA_ARGS[@]}" "${FLEXSP_TRAIN_ARGS[@]}" \
    "${costarg[@]}" --sp-mode "$mode" "${cp[@]}" "${ckpt[@]}" \
    --metrics-file "$FLEXSP_RUN_DIR/metrics-$mode.jsonl" "$@"
}

# flexsp_profile [EXTRA PROFILER FLAGS...]: flexsp-profile on every rank of the allocation with the
# preset's model; writes $FLEXSP_RUN_DIR/cost_model.json (pass it to training as COST_MODEL=...).
flexsp_profile() {
  flexsp_preset_args
  echo "flexsp-slurm: profiling, cost model -> $FLEXSP_RUN_DIR/cost_model.json"
  flexsp_launch -m megatron.flexsp.training.profiler "${FLEXSP_MODEL_ARGS[@]}" "${FLEXSP_DATA_ARGS[@]}" \
    --output "$FLEXSP_RUN_DIR/cost_model.json" "$@"
}

# flexsp_compare [EXTRA TRAINER FLAGS...]: every sp-mode on the same data, then one table.
flexsp_compare() {
  local mode rc=0 specs=()
  for mode in ${FLEXSP_COMPARE_MODES:-static flexsp batch-adaptive megatron-hybrid-cp}; do
    if flexsp_train "$mode" "$@"; then
      specs+=("$mode=$FLEXSP_RUN_DIR/metrics-$mode.jsonl")
    else
      echo "flexsp-slurm: sp-mode $mode failed" >&2; rc=1
    fi
  done
  [ ${#specs[@]} -gt 0 ] || flexsp_die "every sp-mode failed"
  "$FLEXSP_PYTHON" -m megatron.flexsp.training.summary compare "${specs[@]}" --baseline static \
    | tee "$FLEXSP_RUN_DIR/compare_table.txt"
  return $rc
}
