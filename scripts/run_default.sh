#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: install what is missing, then search ->
# prune -> save -> evaluate SmolLM2-135M at 80% of its parameters on the offline C4 train sample.
# Usage: bash scripts/run_default.sh [OUTPUT_DIR] [extra search options, e.g. --overwrite]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1
out=${1:-outputs/smollm2-135m-dms-80}
shift || true
exec ${PYTHON:-python3} -m dms_llm.commands search --config recipes/smollm2-135m-default.yaml --output-dir "$out" "$@"
