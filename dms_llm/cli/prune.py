"""Prune a checkpoint from its files, one tensor at a time, without loading the model.

    dms-llm prune --plan runs/llama2-80/dms_plan.json --model meta-llama/Llama-2-7b-hf --output-dir out/llama2-80
    dms-llm prune --plan flap80/dms_plan.json --output-dir out/flap80-comp --refit --refit-select reconstruction

The source's safetensors files are read tensor by tensor and sliced by the plan's rules; the folder is the
one `save_pruned(prune_model(model, plan), ...)` writes, byte for byte, with one output shard in memory
at a time (`dms_llm.checkpoints.stream_prune`). With --refit the pruned model is then compensated as
`dms-llm search --refit` does (any plan: a search's or a baseline's), the source's sublayers read from its
files one at a time, and the folder is written again.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..checkpoints.stream_prune import DEFAULT_MAX_SHARD_SIZE, prune_checkpoint
from ..runs.options import ConfigError, data_dir_default, option, run_main
from ..runs.options import parse_config as _parse_config
from ..runs.search import RefitOptions


@dataclass
class PruneConfig(RefitOptions):
    plan: str | None = option(None, "the plan (dms_plan.json, as a search or a baseline writes it)")
    model: str | None = option(None, "the source model: local folder, Hub id in the local cache, or alias "
                                     "(default: the embedded SmolLM2-135M)")
    output_dir: str | None = option(None, "where the pruned checkpoint goes")
    overwrite: bool = option(False, "replace an existing, non-empty --output-dir")
    dtype: str = option("auto", "auto (the checkpoint's own), float32, bfloat16 or float16")
    max_shard_size: str = option(DEFAULT_MAX_SHARD_SIZE, "largest output shard, e.g. 2GB; one shard is held in memory")
    dataset: str = option("default", "calibration text of the refit (as dms-llm search --dataset)")
    seq_len: int = option(256, "tokens per calibration block")
    data_seed: int = option(0, "seed of the calibration block selection")
    data_dir: str | None = option(None, "the data folder (default: $DMS_DATA_DIR, else ../shared/data)")

    def __post_init__(self):
        if not self.plan:
            raise ConfigError("give --plan (a dms_plan.json)")
        if not self.output_dir:
            raise ConfigError("give --output-dir (where the pruned checkpoint goes)")
        if not os.path.isfile(self.plan):
            raise ConfigError(f"--plan {self.plan}: no such file")
        super().__post_init__()
        if self.refit and self.refit_hidden == "fill":
            raise ConfigError("--refit-hidden fill runs the dense model beside the pruned one, and dms-llm prune reads the "
                              "source from its files one sublayer at a time: refit with the search instead (dms-llm search "
                              "--refit --refit-hidden fill), or pass --refit-hidden zero")
        if self.seq_len < 1:
            raise ConfigError("--seq-len must be positive")


def parse_config(argv=None) -> PruneConfig:
    return _parse_config(PruneConfig, argv, __doc__, prog="dms-llm prune")


def run(cfg: PruneConfig, argv=()) -> dict:
    from ..plan import PrunePlan

    plan = PrunePlan.from_json(cfg.plan)
    plan.metadata.then("dms-llm prune " + " ".join(argv))  # after the command that made the plan, if it says
    out = prune_checkpoint(plan, cfg.model, cfg.output_dir, overwrite=cfg.overwrite, dtype=cfg.dtype,
                           max_shard_size=cfg.max_shard_size)
    if cfg.refit:
        _refit(cfg, plan, out)
    saved = PrunePlan.from_json(os.path.join(out, "dms_plan.json"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"pruned checkpoint: {out}\nparameters: {saved.params_before:,} -> {saved.params_after:,} "
          f"({saved.params_after / saved.params_before:.2%}); weights {size / 1e9:.2f} GB ({size:,} bytes)")
    return {"finished": True, "output_dir": out}


def _refit(cfg: PruneConfig, plan, out: str) -> None:
    """Compensate the checkpoint just written in `out` and write it again (plan and weights)."""
    from transformers import AutoModelForCausalLM

    from ..checkpoints import save_pruned
    from ..checkpoints.loading import load_tokenizer, local_model_folder
    from ..checkpoints.stream_prune import source_structure
    from ..data import load_calibration
    from ..refit import refit_output_projections

    tokenizer = load_tokenizer(out, local_files_only=True)
    blocks = load_calibration(cfg.dataset, tokenizer, cfg.seq_len, cfg.refit_samples, seed=cfg.data_seed,
                              data_dir=data_dir_default(cfg.data_dir))
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    source_dir = local_model_folder(cfg.model)
    source, files = source_structure(source_dir, pruned.dtype)
    plan.metadata.refit = refit_output_projections(pruned, source, plan, blocks, alpha=cfg.refit_alpha,
                                                   select=cfg.refit_select, progress=True, read_source=files.read)
    info = plan.metadata.refit
    print(f"refit ({cfg.refit_select}): relative sublayer error {info['relative_error_before']:.4f} -> "
          f"{info['relative_error_after']:.4f} on {info['tokens']:,} tokens in {info['time_s']:.0f} s")
    save_pruned(pruned, tokenizer, out, plan, overwrite=True, source_dir=source_dir,
                max_shard_size=cfg.max_shard_size)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda cfg: run(cfg, argv), parse_config, argv)
