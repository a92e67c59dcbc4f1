#!/usr/bin/env bash
# Install FlexSP-Megatron's GPU stack into a Python that already has a CUDA build of torch (an
# NGC PyTorch container, or your cluster's torch module / venv). Why a script: Transformer Engine's
# PyTorch extension and flash-attn compile against the installed torch, so they must be installed
# with --no-build-isolation (their projects' documented procedure), and nothing may replace that
# torch (which is why setup.py has no GPU extra).
#
#   bash scripts/setup_gpu.sh [--no-te] [--no-flash] [--dev] [--check] [--dry-run]
#
#   --no-te / --no-flash   skip Transformer Engine / flash-attn (sdpa works without both)
#   --dev                  also the test extra ([dev]: pytest, ruff, ...)
#   --check                run scripts/device_check.sh at the end (one GPU, under 5 minutes)
#   --dry-run              print the pip commands instead of running them
#
# Environment: PYTHON (default: python, else python3), MCORE_SPEC (default megatron-core>=0.16.1),
# TE_SPEC (default "transformer_engine[pytorch]>=2.10,<2.13", the releases reviewed for FlexSP),
# FLASH_ATTN_VERSION (default 2.8.3: TE 2.10-2.12 accept flash-attn >=2.1.1 (>=2.7.3 on
# Blackwell) and <=2.8.3; outside that range TE silently stops using flash-attn), MAX_JOBS
# (parallel compile jobs for flash-attn, default 4; each needs several GB of RAM).
# Already working installs (e.g. the TE and flash-attn an NGC container ships) are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

te=1 flash=1 dev=0 check=0 dry=0
for a in "$@"; do
  case $a in
    --no-te) te=0 ;;
    --no-flash) flash=0 ;;
    --dev) dev=1 ;;
    --check) check=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup_gpu: unknown option $a (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$(command -v python || command -v python3)}
MCORE_SPEC=${MCORE_SPEC:-megatron-core>=0.16.1}
TE_SPEC=${TE_SPEC:-transformer_engine[pytorch]>=2.10,<2.13}
FLASH_ATTN_VERSION=${FLASH_ATTN_VERSION:-2.8.3}
export MAX_JOBS=${MAX_JOBS:-4}

say() { echo "setup_gpu: $*"; }
run() {
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi
}

# 1. torch must be there already, with CUDA; it is pinned for every pip call below.
if ! info=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "")' 2>/dev/null); then
  say "no torch in $PY: install a CUDA build of torch first (or use an NGC PyTorch container)" >&2
  exit 2
fi
read -r torch_version cuda <<<"$info"
cuda=${cuda:-}
if [ -z "$cuda" ]; then
  if [ "$dry" = 1 ]; then
    say "warning: torch $torch_version is a CPU build (a real run stops here)"
  else
    say "torch $torch_version is a CPU build: TE and flash-attn need a CUDA build of torch" >&2
    exit 2
  fi
fi
say "using $PY, torch $torch_version (CUDA ${cuda:-none})"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
PIP=("$PY" -m pip install -c "$constraints")

# 2. megatron-core and this package. --no-deps for this package: its requirements must not touch
# the installed torch; the light ones are installed explicitly.
run "${PIP[@]}" "$MCORE_SPEC" "numpy>=1.24" "scipy>=1.11" tqdm
run "${PIP[@]}" --no-deps -e .
[ "$dev" = 1 ] && run "${PIP[@]}" -e ".[dev]"

# 3. Transformer Engine (its install guide: pip install --no-build-isolation transformer_engine[pytorch]).
if [ "$te" = 1 ]; then
  if "$PY" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
    say "Transformer Engine already imports ($("$PY" -c 'import transformer_engine as t; print(t.__version__)' 2>/dev/null)): kept"
  else
    run "${PIP[@]}" pybind11 ninja packaging
    run "${PIP[@]}" --no-build-isolation "$TE_SPEC"
  fi
fi

# 4. flash-attn (its README: pip install flash-attn --no-build-isolation), pinned inside TE's range.
if [ "$flash" = 1 ]; then
  have=$("$PY" -c 'import flash_attn; print(flash_attn.__version__)' 2>/dev/null || true)
  if [ -n "$have" ]; then
    say "flash-attn $have already imports: kept (TE uses it only within its supported range, see below)"
  else
    run "${PIP[@]}" ninja packaging psutil
    run "${PIP[@]}" --no-build-isolation "flash-attn==$FLASH_ATTN_VERSION"
  fi
fi

[ "$dry" = 1 ] && exit 0

# 5. What FlexSP will use: the real imports, TE's accepted flash-attn range, the 'auto' choice.
"$PY" - <<'EOF'
import importlib.metadata as md

import torch

from megatron.flexsp.runtime.attention import backend_importable, resolve_backend

print(f"setup_gpu: torch {torch.__version__}, megatron-core {md.version('megatron-core')}")
for name in ("te", "flash"):
    print(f"setup_gpu: backend {name}: {'imports' if backend_importable(name) else 'NOT importable'}")
if backend_importable("te") and backend_importable("flash"):
    try:
        from transformer_engine.pytorch.attention.dot_product_attention.utils import FlashAttentionUtils as F
        from packaging.version import Version

        v = Version(md.version("flash-attn"))
        ok = F.version_required <= v <= F.max_version
        print(f"setup_gpu: flash-attn {v} {'inside' if ok else 'OUTSIDE'} TE's range "
              f"[{F.version_required}, {F.max_version}]" + ("" if ok else ": TE will not use it"))
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"setup_gpu: could not read TE's flash-attn range ({type(e).__name__}: {e})")
if torch.cuda.is_available():
    print(f"setup_gpu: --attention-backend auto with --bf16 picks: {resolve_backend('auto', torch.device('cuda'), bf16=True)}")
EOF

if [ "$check" = 1 ]; then
  PYTHON="$PY" bash scripts/device_check.sh
fi
