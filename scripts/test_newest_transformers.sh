#!/usr/bin/env bash
# Before users meet it: the modeling and generation tests on the newest transformers on the package
# index, whatever pyproject.toml allows. Run it when starting work on the project; a failure here is a
# release that breaks published checkpoints' modeling files. Prints the version and pytest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/test_transformers.sh "" "$@"
