#!/usr/bin/env bash
# The modeling and generation tests on the oldest transformers that pyproject.toml allows (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/.*"transformers>=\([0-9][0-9.]*[0-9]\).*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "no transformers>=X.Y lower bound in pyproject.toml" >&2; exit 2; }
exec bash scripts/test_transformers.sh "==$oldest.*" "$@"
