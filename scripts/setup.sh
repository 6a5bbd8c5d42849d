#!/usr/bin/env bash
# Creates .venv and installs vr1fast (editable) with its dev tools.
# torch stays pinned through a constraints file in every pip call: without it pip pulls a multi-GB CUDA torch.
# With no CUDA GPU present the CPU wheel of torch 2.13.0 is used. torchvision is never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VR1FAST_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${VR1FAST_TORCH:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip

CONSTRAINTS="$VENV/constraints.txt"
if python -c "import torch" 2>/dev/null; then
  echo "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" > "$CONSTRAINTS"
else
  echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
  pip install -q -c "$CONSTRAINTS" "torch==${TORCH_VERSION}"
fi
pip install -q -c "$CONSTRAINTS" -e ".[dev]"
if pip show torchvision >/dev/null 2>&1; then
  echo "error: torchvision is installed in $VENV; it breaks transformers imports without CUDA. Remove it." >&2
  exit 1
fi
python -c "import torch, triton, transformers, vr1fast; print('vr1fast ready: torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
