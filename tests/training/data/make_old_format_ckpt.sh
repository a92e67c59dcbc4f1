#!/bin/bash
# How tests/training/data/old_format_ckpt was made (kept for the record; do not rerun on a new
# format: the point of the data is that it was written by the code before the state registry).
#   git worktree add /tmp/base d7fa2ab && cd /tmp/base
#   torchrun --nproc-per-node 2 pretrain_gpt_flexsp.py $(expected.json args) \
#       --save /tmp/oldck/A --save-interval 3 --metrics-file /tmp/oldck/A.jsonl
# iter_0000003 is the checkpoint; expected.json's continuation_losses are iterations 4-6 of
# that uninterrupted run (a second uninterrupted run and a resume from iter_0000003 with the
# same code gave bit-identical losses). --sp-mode static keeps the plans independent of the
# measured times, so the losses are exact; calibration still runs and is checkpointed.
set -euo pipefail
OUT=${1:?out dir}
ARGS=$(python -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['args']))" "$(dirname "$0")/old_format_ckpt/expected.json")
python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29533 \
    pretrain_gpt_flexsp.py $ARGS --save "$OUT" --save-interval 3 --metrics-file "$OUT/metrics.jsonl"
