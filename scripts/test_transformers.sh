#!/usr/bin/env bash
# Runs the modeling and generation tests on another transformers release: the dms_llama modeling files
# travel inside checkpoints and meet whatever transformers a user has.
#   bash scripts/test_transformers.sh SPEC [pytest args]
# SPEC is a pip requirement for transformers: "==5.23.*", ">=5.23,<5.26", or "" for the newest on the
# index. The release goes into its own virtual environment, which sees the current environment's
# packages (a .pth file adds its site-packages) and installs only what that release needs beyond them
# (transformers 5.25 brings kernels and tomlkit). Prints the version tested, then pytest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 SPEC [pytest args]   (SPEC: '==5.23.*', '>=5.23,<5.26', or '' for the newest)" >&2; exit 2; }
spec=$1; shift
PY=${PYTHON:-python3}
# One venv per release and parent environment: its .pth names the parent's site-packages, so a venv made
# from another interpreter (the system one, another virtualenv) must not be reused.
parent=$($PY -c "import hashlib, sys; print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:10])")
venv=${TMPDIR:-/tmp}/dms_llm-transformers-$(printf '%s' "${spec:-newest}" | tr -c 'A-Za-z0-9.' '_')-$parent
if [ ! -x "$venv/bin/python" ]; then
  $PY -m venv "$venv"
  # addsitedir (not a bare path) so the parent's own .pth files load too: the editable dms_llm install.
  pth=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_dms_llm_parent.pth
  $PY -c "import site, sys; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in site.getsitepackages()))" > "$pth"
fi
# --upgrade: the newest release SPEC allows, even where the current environment's already satisfies it.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "transformers$spec"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
echo "transformers $version (requested: transformers${spec:- newest})"
exec "$venv/bin/python" -m pytest -q tests/test_modeling.py tests/test_generate.py "$@"
