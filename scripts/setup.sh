#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install FlexSP-Megatron with its test extras.
# torch is pinned to the CPU build the development machines carry on local disk; GPU users
# start from their own CUDA torch and run scripts/setup_gpu.sh (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${FLEXSP_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "environment ready: $(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null)"
