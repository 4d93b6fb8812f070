"""Prune a checkpoint from its files, one tensor at a time, without loading the model.

    dms-llm prune --plan runs/llama2-80/dms_plan.json --model meta-llama/Llama-2-7b-hf --output-dir out/llama2-80

The source's safetensors files are read tensor by tensor and sliced by the plan's rules; the folder is the
one `save_pruned(prune_model(model, plan), ...)` writes, byte for byte, with one output shard in memory
at a time (`dms_llm.checkpoints.stream_prune`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..checkpoints.stream_prune import DEFAULT_MAX_SHARD_SIZE, prune_checkpoint
from .options import ConfigError, option, run_main
from .options import parse_config as _parse_config


@dataclass
class PruneConfig:
    plan: str | None = option(None, "the plan (dms_plan.json, as a search or a baseline writes it)")
    model: str | None = option(None, "the source model: local folder, Hub id in the local cache, or alias "
                                     "(default: the embedded SmolLM2-135M)")
    output_dir: str | None = option(None, "where the pruned checkpoint goes")
    overwrite: bool = option(False, "replace an existing, non-empty --output-dir")
    dtype: str = option("auto", "auto (the checkpoint's own), float32, bfloat16 or float16")
    max_shard_size: str = option(DEFAULT_MAX_SHARD_SIZE, "largest output shard, e.g. 2GB; one shard is held in memory")

    def __post_init__(self):
        if not self.plan:
            raise ConfigError("give --plan (a dms_plan.json)")
        if not self.output_dir:
            raise ConfigError("give --output-dir (where the pruned checkpoint goes)")
        if not os.path.isfile(self.plan):
            raise ConfigError(f"--plan {self.plan}: no such file")


def parse_config(argv=None) -> PruneConfig:
    return _parse_config(PruneConfig, argv, __doc__, prog="dms-llm prune")


def run(cfg: PruneConfig, argv=()) -> dict:
    from ..plan import PrunePlan

    plan = PrunePlan.from_json(cfg.plan)
    command = "dms-llm prune " + " ".join(argv)
    out = prune_checkpoint(plan, cfg.model, cfg.output_dir, overwrite=cfg.overwrite, dtype=cfg.dtype,
                           max_shard_size=cfg.max_shard_size, model_card_info={"command": command})
    saved = PrunePlan.from_json(os.path.join(out, "dms_plan.json"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"pruned checkpoint: {out}\nparameters: {saved.params_before:,} -> {saved.params_after:,} "
          f"({saved.params_after / saved.params_before:.2%}); weights {size / 1e9:.2f} GB ({size:,} bytes)")
    return {"finished": True, "output_dir": out}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda cfg: run(cfg, argv), parse_config, argv)
