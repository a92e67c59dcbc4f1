#!/usr/bin/env bash
# Train the same model on the same data under several --sp-mode values, one after another, and
# print one table (tokens/s, ms/iteration, speedup over static, final loss) from their metrics files.
#
#   bash scripts/compare_sp_modes.sh [pretrain_gpt_flexsp.py flags ...]
#
# Environment: NPROC (ranks on this machine, default 4), MODES (default
# "static flexsp batch-adaptive megatron-hybrid-cp"), OUT (output folder, default
# outputs/compare-<time>), PYTHON (default .venv/bin/python, else python3), LAUNCH (the launcher,
# default "$PYTHON -m torch.distributed.run --nproc-per-node $NPROC"; set it to use srun),
# PAIRED=1 (the flexsp run also executes every batch under the static plan, back to back:
# a comparison immune to load changes between runs on shared machines),
# CLUSTER=host (default: NPROC ranks on this machine over loopback) | emulated (NODES network-namespace
# "nodes" x NPROC/NODES ranks with LINK_MBIT-shaped links between them, scripts/emulated_cluster.sh;
# needs root + iproute2, else it stops) | auto (emulated when possible, else host, and says so);
# NODES (default 2), LINK_MBIT (default 200), LATENCY_MS (default 0).
# Flags given here are added to every run (e.g. --mock-data --seq-length 4096 --train-iters 30);
# without flags: the quickstart's small GPT on the embedded stdlib corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NPROC=${NPROC:-4}
MODES=${MODES:-"static flexsp batch-adaptive megatron-hybrid-cp"}
OUT=${OUT:-outputs/compare-$(date +%Y%m%d-%H%M%S)}
CLUSTER=${CLUSTER:-host}
NODES=${NODES:-2}
LINK_MBIT=${LINK_MBIT:-200}
LATENCY_MS=${LATENCY_MS:-0}
mkdir -p "$OUT"
case "$CLUSTER" in
  host|emulated|auto) ;;
  *) echo "CLUSTER=$CLUSTER: expected host, emulated or auto" >&2; exit 1 ;;
esac
if [ "$CLUSTER" != host ] && [ -n "${LAUNCH:-}" ]; then
  echo "CLUSTER=$CLUSTER and LAUNCH are exclusive (LAUNCH names its own launcher)" >&2; exit 1
fi
if [ "$CLUSTER" != host ]; then
  if [ $((NPROC % NODES)) != 0 ]; then
    echo "CLUSTER=$CLUSTER: NPROC=$NPROC is not a multiple of NODES=$NODES" >&2; exit 1
  fi
  EMU=(bash scripts/emulated_cluster.sh --nodes "$NODES" --gpus-per-node $((NPROC / NODES))
       --link-mbit "$LINK_MBIT" --latency-ms "$LATENCY_MS")
  if why=$("${EMU[@]}" --check 2>&1); then
    CLUSTER=emulated
  elif [ "$CLUSTER" = emulated ]; then
    echo "$why" >&2; exit 1
  else
    echo "$why"
    echo "(CLUSTER=auto: running on one host instead)"
    CLUSTER=host
  fi
fi
if [ "$CLUSTER" = emulated ]; then
  LAUNCH="env PYTHON=$PYTHON ${EMU[*]} --"
  WHERE="emulated cluster: $NODES nodes x $((NPROC / NODES)) ranks (network namespaces), inter-node links ${LINK_MBIT} Mbit/s (tc tbf), latency ${LATENCY_MS} ms, loopback inside a node"
else
  LAUNCH=${LAUNCH:-"$PYTHON -m torch.distributed.run --nproc-per-node $NPROC --master-addr 127.0.0.1 --master-port ${MASTER_PORT:-29533}"}
  WHERE="one host: $NPROC ranks over loopback (no node boundary)"
fi
echo "cluster: $WHERE"

DEFAULTS=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --group-query-attention
          --swiglu --seq-length 2048 --global-batch-size 32 --train-iters 12 --lr 2e-3 --lr-warmup-iters 2
          --seed 1234 --no-progress-bar --log-interval 1)
specs=()
for mode in $MODES; do
  metrics="$OUT/$mode.jsonl"
  rm -f "$metrics"
  echo "== sp-mode $mode  (log: $OUT/$mode.log)"
  # later flags win in argparse, so the caller's flags override the defaults
  paired=()
  if [ "${PAIRED:-0}" = 1 ] && [ "$mode" = flexsp ]; then paired=(--flexsp-compare-with static); fi
  if ! $LAUNCH pretrain_gpt_flexsp.py "${DEFAULTS[@]}" "$@" --sp-mode "$mode" --metrics-file "$metrics" \
      ${paired[@]+"${paired[@]}"} > "$OUT/$mode.log" 2>&1; then
    echo "sp-mode $mode failed; last lines of $OUT/$mode.log:" >&2
    grep -v "Warning\|warnings.warn" "$OUT/$mode.log" | tail -20 >&2
    exit 1
  fi
  grep "iteration .*/" "$OUT/$mode.log" | tail -1
  specs+=("$mode=$metrics")
done
echo
{ "$PYTHON" -m megatron.flexsp.training.summary compare "${specs[@]}" --baseline static
  echo "cluster: $WHERE"; } | tee "$OUT/table.txt"
echo "(metrics files and logs in $OUT)"
