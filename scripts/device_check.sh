#!/usr/bin/env bash
# One-GPU check of the GPU code paths, at most 8 minutes: TE and flash-attn varlen attention against
# SDPA (forward and backward, bf16); every backend against SDPA-math in fp32 and bf16 with GQA at 4K
# and 32K tokens; TE's set-up time per new packed shape; flexsp-profile on this GPU (prints the
# fitted cost model); a timed 2-layer run (FSDP2) with each attention backend and FSDP2 against
# DDP; one table of every stage (pass, FAIL, error, TIMEOUT, skipped with why). Outputs under $OUT (if set) or
# outputs/device-check-<time>: stages.jsonl (one line per stage as it finishes), device_check.txt
# / .json (rewritten after every stage, so a run cut short keeps what it finished), cost_model.json,
# logs.
#   bash scripts/device_check.sh [--train-iters N] [--skip-train] [--skip-profile] [--budget-s S]
# Exit: 0 all passed, 1 a check failed, 3 no NVIDIA GPU here (nothing was run), 4 a stage timed out
# (no failure), 124 stopped by the time limit (DEVICE_CHECK_TIMEOUT_S, default 480 s; the Python
# side plans its stages within DEVICE_CHECK_BUDGET_S, default 20 s less), 128+N stopped by signal N.
#
# Processes: nothing here starts a new session, so every stage process stays reachable by the
# `timeout` below (it signals its whole process group) and by whoever runs this script. On exit,
# normal or not, the trap kills whatever is left of that process group.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 \
    | sed 's/^/device_check: GPU: /'
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
limit=${DEVICE_CHECK_TIMEOUT_S:-480}
export DEVICE_CHECK_BUDGET_S=${DEVICE_CHECK_BUDGET_S:-$((limit > 40 ? limit - 20 : limit / 2))}

tpid=""
cleanup() {
  # timeout leads its own process group (pgid = its pid): end every process still in it.
  if [ -n "$tpid" ]; then
    kill -KILL -- "-$tpid" 2>/dev/null
  fi
}
on_signal() {
  local sig=$1
  if [ -n "$tpid" ]; then
    kill "-$sig" -- "-$tpid" 2>/dev/null  # the Python side writes its partial report on TERM/INT/HUP
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$tpid" 2>/dev/null || break; sleep 0.5; done
  fi
  cleanup
  echo "device_check: stopped by SIG$sig" >&2
  trap - EXIT
  case $sig in INT) exit 130 ;; HUP) exit 129 ;; *) exit 143 ;; esac
}
trap cleanup EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# In the background plus `wait`, so the traps above run at once when a signal arrives.
timeout --kill-after=10 "$limit" "$PYTHON" scripts/device_check.py "$@" &
tpid=$!
wait "$tpid"
rc=$?
[ $rc -eq 124 ] && echo "device_check: stopped after ${limit}s (time limit); the stages that finished are in the report" >&2
exit $rc
