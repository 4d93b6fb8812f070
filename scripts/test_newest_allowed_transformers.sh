#!/usr/bin/env bash
# The modeling and generation tests on the newest transformers that pyproject.toml allows (CI runs it;
# a machine that installed dms_llm earlier may still hold an older release in its main environment).
set -euo pipefail
cd "$(dirname "$0")/.."
range=$(sed -n 's/.*"transformers\(>=[^"]*\)".*/\1/p' pyproject.toml)
[ -n "$range" ] || { echo "no transformers>=... requirement in pyproject.toml" >&2; exit 2; }
exec bash scripts/test_transformers.sh "$range" "$@"
