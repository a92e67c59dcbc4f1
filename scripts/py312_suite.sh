#!/usr/bin/env bash
# The default test suite on Python 3.12 + megatron-core 0.19.x (CPU), the combination GPU
# clusters run. Why: CI checks Python 3.11 + megatron-core 0.16.1 only; this script makes the
# other supported end reproducible in one command. It creates (or reuses) .venv312 in the
# repository root, installs torch (registry build, pinned), megatron-core 0.19.x and this
# package with its [dev] extra, then runs `pytest -q` (pytest.ini's default: not slow).
#
#   bash scripts/py312_suite.sh                 # set up if needed, then run the default suite
#   bash scripts/py312_suite.sh --setup-only    # only create / update .venv312
#   bash scripts/py312_suite.sh --tests-only [pytest args]   # reuse .venv312, pass args to pytest
#
# Environment: PYTHON312 (interpreter; default: newest pyenv 3.12.x, else python3.12 on PATH),
# FLEXSP_PY312_VENV (default .venv312), FLEXSP_PY312_TORCH (default 2.9.1),
# FLEXSP_PY312_MCORE (default "megatron-core>=0.19,<0.20"), NICE (default 10: niceness of the
# test run, so a shared machine stays usable). Exit code: pytest's (or 2 when set-up fails).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=all
case "${1:-}" in
  --setup-only) mode=setup; shift ;;
  --tests-only) mode=tests; shift ;;
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

VENV=${FLEXSP_PY312_VENV:-.venv312}
case $VENV in /*) ;; *) VENV="$PWD/$VENV" ;; esac
TORCH_VERSION=${FLEXSP_PY312_TORCH:-2.9.1}
MCORE_SPEC=${FLEXSP_PY312_MCORE:-megatron-core>=0.19,<0.20}

find_py312() {
  if [ -n "${PYTHON312:-}" ]; then echo "$PYTHON312"; return 0; fi
  local root=${PYENV_ROOT:-$HOME/.pyenv} best=""
  if [ -d "$root/versions" ]; then
    best=$(ls -d "$root"/versions/3.12.* 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$best" ] && [ -x "$best/bin/python3.12" ]; then echo "$best/bin/python3.12"; return 0; fi
  fi
  command -v python3.12 || return 1
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    local py
    py=$(find_py312) || { echo "py312_suite: no Python 3.12 found (set PYTHON312, or: pyenv install 3.12)" >&2; exit 2; }
    echo "py312_suite: creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "py312_suite: $VENV is not a Python 3.12 environment; remove it and rerun" >&2; exit 2; }
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned, so neither megatron-core nor this package pulls another version.
  "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q "$MCORE_SPEC" "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q -e ".[dev]" "torch==$TORCH_VERSION"
}

versions() {
  "$VENV/bin/python" - <<'EOF'
import sys, importlib.metadata as md
import torch
print(f"py312_suite: Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {md.version('megatron-core')}, CUDA available: {torch.cuda.is_available()}")
EOF
}

if [ "$mode" != tests ]; then setup; fi
if [ ! -x "$VENV/bin/python" ]; then echo "py312_suite: $VENV missing; run without --tests-only first" >&2; exit 2; fi
versions
[ "$mode" = setup ] && exit 0
# Scripts the tests start pick their interpreter from PYTHON (else .venv): point them here.
export PYTHON="$VENV/bin/python"
exec nice -n "${NICE:-10}" "$VENV/bin/python" -m pytest -q "$@"
