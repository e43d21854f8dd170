#!/usr/bin/env bash
# Create .venv (if missing) and install hymtl with everything the demo and the tests need.
# Idempotent: a second call only checks that the packages are there.
#   TORCH_SPEC   torch/torchvision to install (default: the versions this project is tested with)
#   EXTRAS       pip extras of hymtl (default: offline,export,test)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-offline,export,test}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_SPEC
fi
python -m pip install -q -e ".[${EXTRAS}]"
python -c "import hymtl, torch, lightning; print(f'hymtl {hymtl.__version__} ready: torch {torch.__version__}, lightning {lightning.__version__}')"
