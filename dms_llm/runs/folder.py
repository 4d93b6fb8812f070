"""Run folders, shared by the search and fine-tuning commands: checks before anything is written,
saving a checkpoint into a folder that holds the run's logs, evaluation before and after a run (each
computed once per folder), the Hub push, and the closing report."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

from ..files import check_output_folder, read_json, replace_folder, write_json_atomic
from ..training.engine import RunSettings
from .options import ConfigError, data_dir_default, option, options, part, record

@dataclass
class RunOptions(RunSettings):
    """The options the training commands (search, finetune) share: the engine's `RunSettings` (batch,
    accumulation, seed, precision, checkpoints) and data, evaluation after the run, Hub push."""

    HELP: ClassVar[dict] = {
        "batch_size": "blocks per micro-batch and process", "grad_accum": "micro-batches per step",
        "seed": "seed of the data order and of everything random (LoRA init, dropout)",
        "mixed_precision": "no, bf16 or fp16 (autocast through Accelerate)",
        "gradient_checkpointing": "recompute activations in backward to save memory",
        "checkpoint_every": "checkpoint every N steps (and on Ctrl-C)",
        "stop_after": "checkpoint and stop after this many steps (continue with --resume)",
        "fsdp": "shard the frozen weights across the processes (FSDP2, a unit per decoder layer) instead of replicating "
                "them; needs 2+ processes, --train-weights none, a safetensors source"}
    # Settings a checkpoint depends on: a resumed run must have the values its checkpoint was made with.
    RESUME: ClassVar[tuple] = ("seed", "dataset", "text_field", "num_samples", "seq_len", "batch_size", "grad_accum", "dtype")
    # What a run's record lacks when it predates a setting: the value that reproduces that run.
    LEGACY: ClassVar[dict] = {}

    text_field: str = option("text", "field holding the text in .json/.jsonl/.parquet data")
    data_dir: str | None = option(None, "data folder (default: $DMS_DATA_DIR, else ../shared/data beside the repository)")
    seq_len: int = option(256, "tokens per block")
    dtype: str = option("auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    resume: bool = option(False, "continue from the checkpoint in --output-dir")
    no_eval: bool = option(False, "skip the evaluation (of the model before and of the result after)")
    eval_ppl: str = option("wikitext2", "held-out perplexity datasets (comma list)")
    eval_protocol: str = option("llm-pruner", "perplexity protocols (comma list): llm-pruner (128-token windows), "
                                              "sparsegpt (2048)")
    eval_max_windows: int | None = option(None, "evaluate only the first N windows (default: the whole split)")
    eval_tasks: str = option("", "zero-shot tasks (comma list; empty: none)")
    eval_limit: float | None = option(None, "zero-shot: the first N documents of each task (a fraction if < 1)")
    push_to_hub: str | None = option(None, "Hub repo id to upload the saved folder to")
    hub_private: bool = option(False, "create the Hub repo as private")

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.eval_limit is not None and self.eval_limit >= 1:
            self.eval_limit = int(self.eval_limit)
        if not self.no_eval:  # a misspelt dataset fails now, not after hours of search
            from ..evaluation import check_ppl_datasets, check_protocols, check_tasks

            try:
                check_ppl_datasets(self.eval_ppl), check_protocols(self.eval_protocol), check_tasks(self.eval_tasks)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def run_settings(self) -> RunSettings:
        return part(self, RunSettings)


def check_resume(cfg, out: str, record_file: str, derived: dict | None = None) -> None:
    """The one resume rule of every command: a checkpoint continues only the run it was made by, so each
    setting in `cfg.RESUME` (with the values the run `derived`, e.g. its resolved step count) must equal
    the one in the run's record (`record_file` in `out`, written when the run started)."""
    path = os.path.join(out, record_file)
    if not (cfg.resume and os.path.isfile(path)):
        return
    was = changed_settings(cfg, read_json(path), cfg.RESUME, derived)
    if was:
        raise ConfigError(f"--resume: the checkpoint in {out} was made with {was}; resume with the same settings")


def changed_settings(cfg, saved: dict, keys: tuple, derived: dict | None = None) -> str:
    """The settings among `keys` whose value in the run record `saved` differs from `cfg`'s (with the values
    the run `derived`), as "--name OLD (now NEW), ..."; "" when none does. A record that predates a setting
    counts as its default (or the value in `cfg.LEGACY` that reproduces that run)."""
    now = record(cfg) | (derived or {})
    defaults = {o.name: o.default for o in options(type(cfg))} | cfg.LEGACY
    recorded = {k: saved.get(k, defaults.get(k)) for k in keys}
    return ", ".join(f"--{k.replace('_', '-')} {recorded[k]} (now {now[k]})" for k in keys if recorded[k] != now[k])


def check_output_dir(out: str, overwrite: bool, resume: bool, can_resume: bool, protected: dict[str, str],
                     markers: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is written: a folder inside (or around) a `protected` one, one around the
    current or home folder, a non-empty one without --overwrite/--resume, --resume without a checkpoint,
    and (with `markers`) --overwrite of a folder that holds none of them."""
    if resume and not can_resume:
        raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume to start")
    # a resumed run keeps its folder: only a fresh start over it needs --overwrite and its markers
    check_output_folder(out, list(protected.items()), overwrite or resume, () if resume else markers,
                        kind="a checkpoint or a run of this command",
                        how="pass --overwrite to replace it, --resume to continue it")


def start_run_folder(out: str, fresh: bool, config: dict, config_file: str, stale=()) -> None:
    """Create the run folder (main process); a fresh start over an old run removes its stale checkpoint
    and logs first, so that they cannot leak into this one."""
    if fresh and os.path.isdir(out):
        for name in ("metrics.jsonl", "tensorboard", *stale):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, config_file), config)


def save_into_run_folder(model, tokenizer, out: str, plan, model_card_info: dict, source_dir: str | None,
                         carry=(), add=None, write_weights=None) -> None:
    """Save a checkpoint into `out`, a run folder that already holds the run's logs and resume state.

    The checkpoint is written into a staging folder beside `out`; the files and folders named in `carry`
    are copied over from `out`, `add(staging)` may write more; then `out` is swapped for it. The finished
    run no longer needs its (possibly large) resume checkpoint, which goes with the old folder.
    """
    from ..checkpoints.save import save_pruned

    def fill(staging):
        save_pruned(model, tokenizer, staging, plan, overwrite=True, model_card_info=model_card_info, source_dir=source_dir,
                    write_weights=write_weights)
        for name in carry:
            src, dst = os.path.join(out, name), os.path.join(staging, os.path.basename(name))
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            elif os.path.exists(src):
                shutil.copy2(src, dst)
        if add is not None:
            add(staging)

    replace_folder(out, fill)


def evaluate(model, tokenizer, cfg, name: str) -> dict:
    """The evaluation a command's `eval_*` options ask for."""
    from ..evaluation import check_protocols, evaluate_model

    return evaluate_model(
        model, tokenizer, ppl=[d for d in cfg.eval_ppl.split(",") if d], protocols=check_protocols(cfg.eval_protocol),
        tasks=[t for t in cfg.eval_tasks.split(",") if t], data_dir=data_dir_default(cfg.data_dir), limit=cfg.eval_limit,
        max_windows=cfg.eval_max_windows, seed=cfg.seed, model_name=name,
    )


def evaluate_once(paths: list[str | None], compute, state, every_process: bool = False) -> dict:
    """`compute()`'s result, computed once: read from the first of `paths` that exists, else computed by the
    main process (with `every_process`, by all of them in step: a sharded model's forward is collective)
    and written to every path by the main one (the others wait and read it)."""
    paths = [p for p in paths if p]
    found = next((p for p in paths if os.path.exists(p)), None)
    # Nothing is written before every process has looked: all of them compute, or none does.
    state.wait_for_everyone()
    if found is not None:
        result = read_json(found)
    else:
        if every_process and not state.is_main_process:
            compute()
        if state.is_main_process:
            result = compute()
            for path in paths:
                write_json_atomic(path, result, indent=None)
        state.wait_for_everyone()
        result = read_json(paths[0])
    if state.is_main_process and not os.path.exists(paths[0]):
        write_json_atomic(paths[0], result, indent=None)
    return result


def evaluate_after(model, tokenizer, cfg, out: str, before: dict | None, write: bool = True) -> dict:
    """Evaluate the saved run's model, with `before` as the baseline row; with `write` (the main process;
    a sharded model is evaluated by every process) results.json/.md and the card."""
    from ..checkpoints.card import update_model_card
    from ..evaluation import write_results

    results = evaluate(model, tokenizer, cfg, name=out)
    if before:
        results["baseline"] = before
    if write:
        write_results(results, os.path.join(out, "results.json"))
        update_model_card(out, results)
    return results


def push(cfg, out: str, summary: dict, state) -> None:
    if cfg.push_to_hub and state.is_main_process:
        from ..hub import push_to_hub

        summary["hub_url"] = push_to_hub(out, cfg.push_to_hub, private=cfg.hub_private)
    state.wait_for_everyone()


def report(summary: dict, before: dict | None, headline: str) -> None:
    """The closing lines: where the checkpoint is, what changed, and the perplexity before -> after."""
    from ..evaluation import ppl_change_lines

    lines = [f"checkpoint: {summary['output_dir']}", headline]
    if summary.get("results"):
        lines += ppl_change_lines(summary["results"], before)
        lines.append(f"results: {os.path.join(summary['output_dir'], 'results.json')}")
    print("\n".join(lines))
