#!/usr/bin/env bash
# One-GPU check of the GPU code paths, under 5 minutes: TE and flash-attn varlen attention against
# SDPA (forward and backward, bf16), flexsp-profile on this GPU (prints the fitted cost model), a
# few training steps with each attention backend, one table. Outputs under $OUT (if set) or
# outputs/device-check-<time>: device_check.txt/.json, cost_model.json, logs.
#   bash scripts/device_check.sh [--train-iters N] [--skip-train] [--skip-profile]
# Exit: 0 all passed, 1 a check failed, 3 no NVIDIA GPU here (nothing was run).
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
timeout --kill-after=10 "${DEVICE_CHECK_TIMEOUT_S:-290}" "$PYTHON" scripts/device_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "device_check: stopped after ${DEVICE_CHECK_TIMEOUT_S:-290}s (time budget)" >&2
exit $rc
