#!/usr/bin/env bash
# One command: set up, train a small GPT with FlexSP on 4 CPU processes (gloo) on the Python
# standard library's sources (embedded corpus, byte-level tokenizer, no download), then the same
# run with vanilla static sequence parallelism, and print the comparison.
#
#   bash scripts/quickstart.sh            (a few minutes on a 2-core machine)
#
# ITERS (default 24) and NPROC (default 4) change the length and the number of ranks; PYTHON=...
# uses an existing environment instead of setting up .venv. Extra flags go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  echo "using PYTHON=$PYTHON (no set-up)"
else
  bash scripts/setup.sh
  PYTHON=.venv/bin/python
fi
ITERS=${ITERS:-24}
NPROC=${NPROC:-4}
OUT=${OUT:-outputs/quickstart}
mkdir -p "$OUT"
echo
echo "FlexSP quickstart: $NPROC gloo ranks, 2-layer GPT (hidden 64), documents up to 2048 tokens;"
echo "cost model 'cpu-tiny' gives each rank room for 512 tokens, so long documents need SP groups of 2-4 ranks."
echo
# PAIRED=1: the FlexSP run also times every batch under the static plan, back to back, so the
# comparison holds even when other work on the machine changes its speed between the two runs.
PYTHON=$PYTHON NPROC=$NPROC OUT=$OUT MODES="flexsp static" PAIRED=1 bash scripts/compare_sp_modes.sh \
  --train-iters "$ITERS" --lr-warmup-iters 3 "$@"
echo
echo "How to read it: 'est ms' is the cost model's time of the plans. Equal estimates mean the planner found"
echo "no schedule better than static's for this model and cost model (on one CPU host all-to-all is cheap), and"
echo "then the tokens/s of the two runs differ only by machine noise; the paired line compares both schedules"
echo "on the same batches back to back. Identical final losses: only the schedule differs, never the math."
echo
echo "FlexSP run, every 5th iteration (full logs and metrics in $OUT):"
grep "iteration .*/" "$OUT/flexsp.log" | awk -F'|' '{split($1, a, " "); split(a[3], b, "/"); if (b[1] == 1 || b[1] % 5 == 0) print $1 "|" $2 "|" $5 "|" $6 "|" $9}' || true
