"""The package is self-contained: a wheel built from this checkout, installed into a fresh virtual
environment (torch and the other dependencies come from the system site), evaluates a zero-shot task on
a tiny model from a folder outside the repository, with the task files that ship inside the wheel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow  # builds and installs a wheel, then a subprocess imports torch, transformers and lm-eval: ~1 min
def test_wheel_installs_and_evaluates_zero_shot_outside_the_repository(tmp_path):
    from test_evaluation import write_fixture_data

    src = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs", "outputs"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path / "dist")])
    (wheel,) = (tmp_path / "dist").glob("dms_llm-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "elsewhere"  # neither the repository nor its ../shared: only what the wheel carries
    work.mkdir()
    model = save_tiny_checkpoint(work / "tiny", "llama-gqa")
    data = write_fixture_data(work / "data")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DMS_DATA_DIR")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    where = _run([str(python), "-c", "import dms_llm; print(dms_llm.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the wheel's copy, not a checkout's
    _run([str(venv / "bin" / "dms-llm"), "eval", model, "--ppl", "none", "--tasks", "piqa", "--source", "local",
          "--data-dir", str(data), "--limit", "2", "--batch-size", "2", "--no-progress", "--output", str(work / "r.json")],
         cwd=work, env=env)
    results = json.loads((work / "r.json").read_text())
    assert results["zero_shot"]["piqa"]["n"] == 2 and 0 <= results["zero_shot"]["piqa"]["value"] <= 1
    assert Path(results["data_sources"]["zero_shot/piqa"]["files"][0]["path"]).is_relative_to(data)
