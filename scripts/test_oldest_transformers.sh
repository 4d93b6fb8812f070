#!/usr/bin/env bash
# The dms_llama modeling files travel inside checkpoints and meet whatever transformers a user has: run
# the modeling and generation tests again on the oldest transformers that pyproject.toml allows, in a
# virtual environment that shares everything else with the current one. CI runs it after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
oldest=$(sed -n 's/.*"transformers>=\([0-9][0-9.]*[0-9]\).*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "no transformers>=X.Y lower bound in pyproject.toml" >&2; exit 2; }
venv=${TMPDIR:-/tmp}/dms_llm-transformers-$oldest
[ -x "$venv/bin/python" ] || $PY -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --no-deps "transformers==$oldest.*"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/python" -c "import sys, transformers as t; print('transformers', t.__version__); sys.exit(not t.__version__.startswith('$oldest'))"
exec "$venv/bin/python" -m pytest -q tests/test_modeling.py tests/test_generate.py "$@"
