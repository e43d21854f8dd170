#!/usr/bin/env bash
# Create .venv (if missing) and install hymtl with everything the demo and the tests need.
# Idempotent: a second call only checks that the packages are there.
#   TORCH_SPEC   torch/torchvision to install (default: the versions this project is tested with)
#   TORCH_INDEX  the package index torch/torchvision come from (pip --index-url), e.g.
#                https://download.pytorch.org/whl/cpu or https://download.pytorch.org/whl/cu126.
#                Unset: on a Linux machine without an NVIDIA GPU (no nvidia-smi, no /dev/nvidia*),
#                the CPU build (TORCH_SPEC's versions with +cpu, from PyTorch's CPU index: about
#                1 GB instead of about 6 GB with CUDA) when that index has it; otherwise, or if that
#                install fails, pip's own index (the CUDA build on Linux). Empty (TORCH_INDEX=):
#                pip's own index, no automatic choice.
#   EXTRAS       pip extras of hymtl (default: offline,export,mlflow,wandb,serve,test: the trackers too,
#                so the logger tests run against a real MLflow server and W&B's offline mode; LitServe
#                for hymtl.serve)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
CPU_INDEX=https://download.pytorch.org/whl/cpu
EXTRAS=${EXTRAS:-offline,export,mlflow,wandb,serve,test}

# A GPU this machine could use with a CUDA (or ROCm) build of torch.
has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 || compgen -G "/dev/nvidia*" >/dev/null || [ -e /dev/dxg ] || [ -e /dev/kfd ]
}

# "torch==2.14.1 torchvision==0.29.1" -> "torch==2.14.1+cpu torchvision==0.29.1+cpu"
cpu_spec() {
  local spec out=""
  for spec in $1; do
    case "$spec" in
      *==*+*) out="$out $spec" ;;
      *==*) out="$out $spec+cpu" ;;
      *) return 1 ;;  # not a pinned version: no CPU twin to ask for
    esac
  done
  echo "${out# }"
}

# Whether pip (its own network settings: proxy, certificates, configured indexes) finds the CPU
# build of the pinned torch, asking the CPU index. A few seconds when it cannot be reached.
cpu_build_available() {
  local torch_pin version
  torch_pin=$(printf '%s\n' $1 | grep '^torch==' | head -n1) || return 1
  version=${torch_pin#torch==}
  python -m pip index versions torch --index-url "$CPU_INDEX" --retries 0 --timeout 15 2>/dev/null \
    | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n' | grep -Fxq "$version"
}

install_torch() {
  if [ -n "${TORCH_INDEX:-}" ]; then  # the user's index: no fallback, its error is the report
    # shellcheck disable=SC2086
    python -m pip install -q ${TORCH_SPEC:-$DEFAULT_TORCH_SPEC} --index-url "$TORCH_INDEX"
    return
  fi
  if [ -z "${TORCH_SPEC+x}" ] && [ -z "${TORCH_INDEX+x}" ] && [ "$(uname -s)" = Linux ] && ! has_gpu; then
    local spec
    if spec=$(cpu_spec "$DEFAULT_TORCH_SPEC") && cpu_build_available "$spec"; then
      echo "setup: no GPU found: installing the CPU build of torch ($spec) from $CPU_INDEX"
      # shellcheck disable=SC2086
      if python -m pip install -q $spec --index-url "$CPU_INDEX"; then
        return
      fi
      echo "setup: the CPU build could not be installed: installing the default build instead"
    else
      echo "setup: no GPU found, but $CPU_INDEX has no CPU build of $DEFAULT_TORCH_SPEC here (no network?):" \
           "installing the default build (TORCH_SPEC / TORCH_INDEX choose another)"
    fi
  fi
  # shellcheck disable=SC2086
  python -m pip install -q ${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  install_torch
fi
python -m pip install -q -e ".[${EXTRAS}]"
python -c "import hymtl, torch, lightning; print(f'hymtl {hymtl.__version__} ready: torch {torch.__version__}, lightning {lightning.__version__}')"
