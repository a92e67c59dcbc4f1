#!/usr/bin/env bash
# FlexSP next to vanilla Megatron-LM on the same model and data: builds the pretrain_gpt.py command
# equivalent to a FlexSP run (same model, data, --context-parallel-size D --cp-comm-type a2a,
# packed documents), runs both one after another, and tabulates tokens/s.
#
#   MEGATRON_LM_PATH=/path/to/Megatron-LM bash scripts/compare_with_megatron.sh [options] [--] FLEXSP FLAGS...
#
# Options:
#   --dry-run                      print both commands (and the flag notes), run nothing
#   --nproc N                      ranks on this node (default 8; NNODES/LAUNCH for more nodes)
#   --cp D                         Megatron's context-parallel size (default: the FlexSP flag
#                                  --context-parallel-size, else the smallest degree holding --seq-length)
#   --megatron-global-batch-size G windows of --seq-length per Megatron iteration (default: FlexSP's
#                                  measured tokens per iteration / --seq-length)
#   --megatron-fsdp                Megatron with --use-torch-fsdp2 (ZeRO-3 like FlexSP) instead of its
#                                  distributed optimizer
#   --out DIR                      logs and metrics (default outputs/megatron-compare-<time>)
# Environment: PYTHON (default .venv/bin/python, else python3), LAUNCH (default
# "$PYTHON -m torch.distributed.run --nproc-per-node N"; e.g. an srun/torchrun line for SLURM).
# The flag mapping is documented in docs/compare_with_megatron.md.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "compare_with_megatron: error: $*" >&2; exit 2; }

DRY=0; NPROC=8; CP=""; GBS=""; FSDP=""; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --nproc) NPROC=${2:?--nproc needs a value}; shift 2 ;;
    --cp) CP=${2:?--cp needs a value}; shift 2 ;;
    --megatron-global-batch-size) GBS=${2:?--megatron-global-batch-size needs a value}; shift 2 ;;
    --megatron-fsdp) FSDP=--megatron-fsdp; shift ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ -n "${MEGATRON_LM_PATH:-}" ] || die "set MEGATRON_LM_PATH to a Megatron-LM checkout (the folder with pretrain_gpt.py)"
if [ ! -f "$MEGATRON_LM_PATH/pretrain_gpt.py" ]; then
  [ "$DRY" = 1 ] || die "MEGATRON_LM_PATH=$MEGATRON_LM_PATH has no pretrain_gpt.py"
  echo "# warning: $MEGATRON_LM_PATH/pretrain_gpt.py does not exist (dry run continues)" >&2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NNODES=${NNODES:-1}
WORLD=$((NPROC * NNODES))
LAUNCH=${LAUNCH:-"$PYTHON -m torch.distributed.run --nproc-per-node $NPROC --master-addr 127.0.0.1 --master-port ${MASTER_PORT:-29541}"}

extra=()
[ -n "$CP" ] && extra+=(--cp "$CP")
[ -n "$GBS" ] && extra+=(--megatron-global-batch-size "$GBS")
[ -n "$FSDP" ] && extra+=("$FSDP")
spec=$("$PYTHON" scripts/megatron_flags.py --world-size "$WORLD" "${extra[@]}" -- "$@") || exit 2
eval "$spec"
SEQ=$("$PYTHON" - "${FLEXSP_ARGS[@]}" <<'PY'
import sys
a = sys.argv[1:]
print(a[len(a) - 1 - a[::-1].index("--seq-length") + 1] if "--seq-length" in a else 2048)
PY
)

print_cmds() {
  echo "# FlexSP ($WORLD ranks):"
  printf '%s' "$LAUNCH pretrain_gpt_flexsp.py"; printf ' %q' "${FLEXSP_ARGS[@]}"; echo
  echo "# vanilla Megatron-LM (context parallel $CP, all-to-all, data parallel $DP):"
  printf '%s' "PYTHONPATH=$MEGATRON_LM_PATH $LAUNCH $MEGATRON_LM_PATH/pretrain_gpt.py"; printf ' %q' "${MEGATRON_ARGS[@]}"; echo
  local n; for n in "${NOTES[@]}"; do echo "# note: $n"; done
}

if [ "$DRY" = 1 ]; then
  print_cmds
  exit 0
fi

OUT=${OUT:-outputs/megatron-compare-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
print_cmds | tee "$OUT/commands.txt"
echo "== FlexSP (log: $OUT/flexsp.log)"
rm -f "$OUT/flexsp.jsonl"
$LAUNCH pretrain_gpt_flexsp.py "${FLEXSP_ARGS[@]}" --metrics-file "$OUT/flexsp.jsonl" > "$OUT/flexsp.log" 2>&1 \
  || { tail -20 "$OUT/flexsp.log" >&2; die "the FlexSP run failed"; }
if [ -z "$GBS" ]; then  # same tokens per iteration as FlexSP measured
  GBS=$("$PYTHON" -c "
import json, sys
r = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
print(max(1, round(sum(x['tokens'] for x in r) / len(r) / int(sys.argv[2]))))" "$OUT/flexsp.jsonl" "$SEQ")
  extra+=(--megatron-global-batch-size "$GBS")
  spec=$("$PYTHON" scripts/megatron_flags.py --world-size "$WORLD" "${extra[@]}" -- "$@") || exit 2
  eval "$spec"
  print_cmds > "$OUT/commands.txt"
fi
echo "== Megatron-LM, global batch $MEGATRON_GBS x $SEQ tokens (log: $OUT/megatron.log)"
PYTHONPATH="$MEGATRON_LM_PATH${PYTHONPATH:+:$PYTHONPATH}" $LAUNCH "$MEGATRON_LM_PATH/pretrain_gpt.py" "${MEGATRON_ARGS[@]}" \
  > "$OUT/megatron.log" 2>&1 || { tail -20 "$OUT/megatron.log" >&2; die "the Megatron-LM run failed"; }
"$PYTHON" scripts/megatron_flags.py table --flexsp-metrics "$OUT/flexsp.jsonl" --megatron-log "$OUT/megatron.log" \
  --gbs "$MEGATRON_GBS" --seq-length "$SEQ" --cp "$CP" | tee "$OUT/table.txt"
