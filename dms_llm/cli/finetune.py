"""Recover a pruned checkpoint's quality by fine-tuning it, optionally distilling from the dense model.

    dms-llm finetune --config recipes/finetune/smollm2-135m-recover.yaml --model runs/smollm2-80 --output-dir runs/ft
    accelerate launch dms_llm/finetune.py --model runs/smollm2-80 --teacher smollm2-135m --output-dir runs/smollm2-80-ft

`--model` is a folder written by `dms-llm search` (or `save_pruned`): it must hold `dms_plan.json`. The
result is saved exactly like a pruning checkpoint (same plan, same format: stock or `dms_llama` with its
modeling code), so both loading paths keep working, with a fine-tuning section in the model card. The
training itself is `dms_llm.training.recovery.recover` (LoRA on every projection present, or all
weights; distillation from the teacher, a second full model in memory, not loaded with
`--distill-weight 0`). Options and recipe keys are the fields of `FinetuneConfig`.
"""
from __future__ import annotations

import shlex
import sys

from ..runs.finetune import FinetuneConfig, run
from ..runs.options import parse_config as _parse_config
from ..runs.options import run_main


def parse_config(argv=None) -> FinetuneConfig:
    return _parse_config(FinetuneConfig, argv, __doc__, exclusive=[("steps", "epochs", "max_tokens")], prog="dms-llm finetune")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda cfg: run(cfg, "dms-llm finetune " + shlex.join(argv)), parse_config, argv)
