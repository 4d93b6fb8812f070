"""The run behind `dms-llm search`: its configuration (`SearchConfig`, also its recipe format and its record)
and `run`, which searches (the library's `dms_llm.training.search_plan`), prunes, saves, evaluates and
pushes into one run folder. `dms_llm.cli.search` reads the command line into a `SearchConfig`; the
benchmark runs the same `run` on the recipe it writes, so both make the same folder.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from typing import ClassVar

from ..method import DMSConfig
from ..refit import DEFAULT_ALPHA as DEFAULT_REFIT_ALPHA
from ..refit import DEFAULT_BLOCKS as DEFAULT_REFIT_BLOCKS
from ..refit import SELECTIONS as REFIT_SELECTIONS
from ..refit import refit_output_projections
from ..training.engine import process_state
from .folder import RunOptions, check_resume
from .options import ConfigError, data_dir_default, make, option, part, read_values, record
from .options import load_recipe as _load_recipe

# Held-out blocks that score --restarts: 32 x 256 tokens ranked six SmolLM2 searches as their test
# perplexities did wherever those differed by 20% or more (docs/RESULTS.md, section 4).
DEFAULT_HELDOUT_SAMPLES = 32
HIDDEN_FILL_IN_MEMORY = ("--refit-hidden fill runs the dense model beside the pruned one, so the search must prune a copy in "
                         "memory: pass --prune-from-files never (not with --fsdp), or --refit-hidden zero")


@dataclass
class RefitOptions:
    """The refit after pruning (`dms_llm.refit`), the same in `dms-llm search` and `dms-llm prune`."""

    refit: bool = option(False, "after pruning, refit each kept o_proj/down_proj by least squares so that the kept heads "
                                "and channels rebuild the source sublayer's output on calibration blocks")
    refit_select: str = option("plan", "which heads and channels each layer keeps in the refit: plan (the plan's choice) or "
                                       "reconstruction (chosen again by the refit's error, same counts)",
                               choices=REFIT_SELECTIONS)
    refit_alpha: float = option(DEFAULT_REFIT_ALPHA, "ridge term of the refit, relative to the mean channel energy")
    refit_samples: int = option(DEFAULT_REFIT_BLOCKS, "calibration blocks the refit reads (a search's: the first of its own)")
    refit_hidden: str = option("zero", "where the plan removes hidden channels, what each refit sublayer's input holds there: "
                                       "zero (nothing, as the pruned model) or fill (predicted from the kept channels by "
                                       "a linear map fit on the dense model, folded into q/k/v and gate/up; needs the "
                                       "dense model in memory)", choices=("zero", "fill"))

    def __post_init__(self):
        if not self.refit_alpha > 0:
            raise ConfigError(f"--refit-alpha must be > 0, got {self.refit_alpha}")
        if self.refit_samples < 1:
            raise ConfigError("--refit-samples must be at least 1")


@dataclass
class SearchConfig(RunOptions, RefitOptions, DMSConfig):
    """`dms-llm search`: the method (`DMSConfig`, the library's defaults), the run (`RunOptions`), the refit
    (`RefitOptions`, as `dms-llm prune`) and what the command adds: the model, data, restarts, the output."""

    OPTION_NAMES: ClassVar[dict] = {"structures": "prune"}
    HELP: ClassVar[dict] = {
        "target_params": "parameter budget of the pruned model, e.g. 5.47e9",
        "target_ratio": "budget as a fraction of the dense parameter count, e.g. 0.8",
        "structures": "structures to search: any of heads,channels,hidden,layers",
        "depth": "'sublayer': attention and MLP gated separately; 'block': whole layers (paper)",
        "spare_first": "keep the first N decoder layers whole (not searched)",
        "spare_last": "keep the last N decoder layers whole (not searched)",
        "align": "kept MLP channels and hidden channels in multiples of N (fast engine kernels; 1: exact)",
        "steps": "search steps; the last 20%% refine channel widths only",
        "ratio_lr": "learning rate of the kept ratios (constant, Adam, no weight decay)",
        "budget_weight": "lambda_res, weight of the budget loss",
        "schedule_fraction": "the target descends over this fraction of the steps, then the widths are refined",
        "hold_budget": "in the refine phase, freeze the hidden width with heads and depth and pull the count onto the "
                       "budget from either side (two-sided budget term)",
        "fit_budget": "at the end, rescale the kept ratios so that the hard count meets the budget",
        "warmup_blocks": "start the importances as the mean Taylor score over this many calibration blocks (0: from "
                         "zero, as the paper)",
        "train_weights": "model weights during the search: none (frozen), lora, full",
        "weight_lr": "learning rate of model weights (with --train-weights lora|full)",
        "lora_r": "LoRA rank (with --train-weights lora)", "lora_alpha": "LoRA alpha",
        "distill": "add KL to the unpruned model's logits (the same weights with masks off)",
        "distill_weight": "weight of the distillation term", "distill_temperature": "distillation temperature",
        "importance": "Taylor score per step: block (the gradient summed over the block, squared: the paper) or token "
                      "(each token's contribution squared, then summed)",
        "ema_decay": "decay of the Taylor-importance moving average",
        "single_element_temperature": "soft-mask steepness of a structure with one element",
    }
    # Settings that shape the mask state, the schedule or the data order: a checkpoint made with others
    # cannot be continued into the run it would have been.
    RESUME: ClassVar[tuple] = RunOptions.RESUME + (
        "prune", "depth", "spare_first", "spare_last", "align", "steps", "target_params", "target_ratio", "data_seed",
        "train_weights", "distill", "warmup_blocks", "importance", "schedule_fraction", "ema_decay")
    LEGACY: ClassVar[dict] = {"align": 1}  # a run that did not record it searched exact widths

    model: str | None = option(None, "local folder, Hub id or alias (smollm2-135m, llama-7b, ...); default: embedded SmolLM2-135M")
    output_dir: str | None = option(None, "where the pruned checkpoint, plan, metrics and results go")
    dataset: str = option("default", "calibration text: default (C4 train sample), c4, wikitext2, ptb, alpaca, or a file/folder")
    num_samples: int = option(256, "calibration blocks")
    data_seed: int | None = option(None, "seed of the calibration block selection (default: --seed)")
    restarts: int = option(1, "independent searches (seeds --seed, --seed+1, ...; same calibration blocks); "
                              "the one with the lowest held-out calibration loss is kept")
    heldout_samples: int | None = option(None, "calibration blocks held out of the search to score it "
                                               "(default: 32 with --restarts, else none)")
    overwrite: bool = option(False, "replace an existing, non-empty --output-dir")
    prune_from_files: str = option("auto", "write the pruned checkpoint from the source's safetensors files, tensor by "
                                           "tensor, instead of pruning a copy in memory: auto (when the source is sharded "
                                           "and the weights are frozen), always, never", choices=("auto", "always", "never"))

    def __post_init__(self):
        if (self.target_params is None) == (self.target_ratio is None):
            raise ConfigError("give exactly one of --target-params and --target-ratio")
        if self.restarts < 1:
            raise ConfigError(f"--restarts must be at least 1, got {self.restarts}")
        if self.heldout_samples is None:
            self.heldout_samples = DEFAULT_HELDOUT_SAMPLES if self.restarts > 1 else 0
        if self.heldout_samples < 0 or (self.restarts > 1 and self.heldout_samples == 0):
            raise ConfigError(f"--heldout-samples must be >= 0, and > 0 with --restarts (it scores them); got {self.heldout_samples}")
        if self.num_samples < 1:
            raise ConfigError("--num-samples must be at least 1")
        if self.output_dir is None:
            raise ConfigError("give --output-dir (where the pruned checkpoint goes)")
        if self.prune_from_files == "always" and self.train_weights != "none":
            raise ConfigError("--prune-from-files always needs --train-weights none: trained weights differ from the files")
        if self.fsdp and (self.train_weights != "none" or self.prune_from_files == "never"):
            raise ConfigError("--fsdp shards frozen weights and prunes from the source files: it needs --train-weights none "
                              "and --prune-from-files auto or always")
        if self.refit and self.refit_hidden == "fill" and (self.fsdp or self.prune_from_files == "always"):
            raise ConfigError(HIDDEN_FILL_IN_MEMORY)
        super().__post_init__()
        RefitOptions.__post_init__(self)  # the other bases' checks: RunOptions, the first, does not chain
        try:
            DMSConfig.__post_init__(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def method(self) -> DMSConfig:
        """The method's settings; the budget goes beside them (`search_plan`), resolved against the model."""
        return part(self, DMSConfig, target_params=None, target_ratio=None)


def load_recipe(path: str) -> dict:
    return _load_recipe(path, SearchConfig)


def resumable(out: str) -> bool:
    """A search checkpoint, or the searches of an unfinished --restarts run, is in `out`."""
    from ..training.engine import has_checkpoint
    from .restarts import RECORD_FILE, RESTARTS_DIR

    if has_checkpoint(os.path.join(out, "search_state")):
        return True
    return os.path.isdir(os.path.join(out, RESTARTS_DIR)) and not os.path.exists(os.path.join(out, RECORD_FILE))


# `dms-llm search` settings that do not change the searched model: where it is written, how it is checkpointed,
# evaluated or published, and how the source is read.
_OUTSIDE_THE_SEARCH = {"output_dir", "overwrite", "resume", "stop_after", "checkpoint_every", "data_dir", "no_eval",
                       "eval_ppl", "eval_protocol", "eval_max_windows", "eval_tasks", "eval_limit", "push_to_hub",
                       "hub_private", "gradient_checkpointing", "fsdp", "prune_from_files"}


def same_search(recorded: dict, values: dict) -> bool:
    """Whether a search folder's `search_config.json` (`recorded`) is the search that the recipe `values` runs:
    both read as `dms-llm search` reads its settings (defaults and derived values filled in, names
    normalised), every setting that shapes the result agrees. The benchmark restores an adopted search under
    the name of the search it would have run when they agree."""

    def settings(given: dict) -> dict | None:
        try:  # a record also holds what the run derived (the resolved budget): not options, left out
            config = make(SearchConfig, read_values(SearchConfig, given, "search settings", lenient=True))
        except (ConfigError, TypeError):
            return None  # not settings a search accepts (today)
        return {k: v for k, v in record(config).items() if k not in _OUTSIDE_THE_SEARCH}

    expected = settings(values)
    return expected is not None and settings(recorded) == expected


def _check_output(cfg: SearchConfig, out: str, source: str) -> None:
    from .restarts import RESTARTS_DIR
    from .folder import check_output_dir

    protected = {"source model folder": source} if os.path.isdir(source) else {}
    # --overwrite replaces a checkpoint or a search run, never a folder of something else
    markers = ("config.json", "dms_plan.json", "search_config.json", "search_state", RESTARTS_DIR)
    check_output_dir(out, cfg.overwrite, cfg.resume, resumable(out), protected, markers)
    check_resume(cfg, out, "search_config.json")


def _check_supported(source: str) -> None:
    """Fail on an unsupported architecture from config.json alone, before loading any weights."""
    if not os.path.isfile(os.path.join(source, "config.json")):
        return  # Hub ids and the embedded default are checked once loaded
    from transformers import AutoConfig

    from ..arch import arch_spec

    arch_spec(AutoConfig.from_pretrained(source))


# ----- the command --------------------------------------------------------------------------------
def run(cfg: SearchConfig, command: str = "dms-llm search") -> dict:
    """One search (or the best of `--restarts`), saved into --output-dir, then evaluated and pushed."""
    from ..checkpoints.loading import resolve_model, training_dtype
    from .restarts import RESTARTS_DIR, keep_best
    from .folder import evaluate_once, push, report

    state = process_state()
    if cfg.fsdp and state.num_processes < 2:
        raise ConfigError("--fsdp shards the weights across processes: launch two or more "
                          "(accelerate launch --num_processes N, or torchrun --nproc_per_node N)")
    out = os.path.abspath(cfg.output_dir)
    source = resolve_model(cfg.model)
    _check_output(cfg, out, source)
    _check_supported(source)
    dense_eval, pruned, tokenizer = None, None, None
    if cfg.restarts == 1:
        result = search_once(cfg, out, source, state, command, evaluate=not cfg.no_eval)
        if not result["summary"]["finished"]:
            return result["summary"]
        summary, pruned, tokenizer, dense_eval = result["summary"], result["pruned"], result["tokenizer"], result["dense_eval"]
    else:
        if state.is_main_process and cfg.overwrite and not cfg.resume and os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        state.wait_for_everyone()
        candidates = []
        for i in range(cfg.restarts):
            seed = cfg.seed + i
            sub = os.path.join(out, RESTARTS_DIR, f"seed-{seed}")
            if not os.path.isfile(os.path.join(sub, "search_summary.json")):
                resume = resumable(sub)
                if state.is_main_process:
                    print(f"search {i + 1}/{cfg.restarts} (seed {seed}){', resuming' if resume else ''}: {sub}", flush=True)
                sub_cfg = dataclasses.replace(cfg, restarts=1, seed=seed, output_dir=sub, no_eval=True, push_to_hub=None,
                                              data_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
                                              resume=resume, overwrite=not resume)
                if not search_once(sub_cfg, sub, source, state, command, evaluate=False)["summary"]["finished"]:
                    return {"finished": False, "restart": i}
            with open(os.path.join(sub, "search_summary.json")) as f:
                candidates.append({"seed": seed, "folder": sub, **json.load(f)})
        summary = keep_best(out, candidates) if state.is_main_process else {}
        state.wait_for_everyone()
        if not cfg.no_eval:  # every rank takes part: evaluate_once synchronises them
            dense, tokenizer = _load(cfg, source, training_dtype(cfg.dtype), state)
            dense_eval = evaluate_once([os.path.join(out, RESTARTS_DIR, "dense_eval.json"),
                                        _dense_cache(cfg, source, training_dtype(cfg.dtype))],
                                       lambda: _evaluate_dense(dense, tokenizer, cfg), state, every_process=cfg.fsdp)
            del dense
            gc.collect()  # it sits in reference cycles: free it before the pruned model loads
    if not cfg.no_eval:
        from .folder import evaluate_after

        if pruned is None or cfg.fsdp:  # under --fsdp every process evaluates its shard of the pruned model
            pruned, tokenizer = _load(dataclasses.replace(cfg, model=out), out, training_dtype(cfg.dtype), state,
                                      main_only=True)
        if pruned is not None:
            summary["results"] = evaluate_after(pruned, tokenizer, cfg, out, dense_eval, write=state.is_main_process)
    push(cfg, out, summary, state)
    if state.is_main_process:
        report(summary, dense_eval, f"parameters: {summary['dense_params']:,} -> {summary['params']:,} "
                                    f"({summary['params_ratio']:.2%}); target {summary['target_params']:,}")
    return summary


def search_once(cfg: SearchConfig, out: str, source: str, state, command: str, evaluate: bool) -> dict:
    """Load, search (`search_plan`, checkpointing into `out`), prune and save into `out`; with `evaluate`,
    the dense model is evaluated first (once per folder and settings). Returns the summary and, when
    finished, the pruned model, the tokenizer and the dense evaluation."""
    from ..checkpoints.loading import training_dtype
    from ..data import load_calibration
    from ..prune import prune_model
    from ..training import Stopped, resolve_budget, search_plan
    from ..training.dms import heldout_loss, score
    from .folder import evaluate_once, save_into_run_folder, start_run_folder

    dtype = training_dtype(cfg.dtype)
    if state.is_main_process:
        print(f"loading {cfg.model or 'smollm2-135m (embedded default)'} as {dtype}", flush=True)
    model, tokenizer = _load(cfg, source, dtype, state)
    method = cfg.method()
    files = _prune_from_files(cfg, source)
    if files is not None and cfg.refit and cfg.refit_hidden == "fill":
        raise ConfigError(HIDDEN_FILL_IN_MEMORY + f" ({source} is sharded: --prune-from-files auto prunes it from the files)")
    try:
        target, dense = resolve_budget(model, method, cfg.target_params, cfg.target_ratio)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with state.main_process_first():  # held-out blocks come from the same selection, after the searched ones
        blocks = load_calibration(cfg.dataset, tokenizer, cfg.seq_len, cfg.num_samples + cfg.heldout_samples,
                                  seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
                                  text_field=cfg.text_field, data_dir=data_dir_default(cfg.data_dir))
    blocks, heldout = blocks[:cfg.num_samples], blocks[cfg.num_samples:]
    if state.is_main_process:
        start_run_folder(out, cfg.overwrite and not cfg.resume, record(cfg) | {
            "target_params_resolved": target, "dense_params": dense}, "search_config.json", stale=("search_state", "dense_eval.json"))
    state.wait_for_everyone()
    dense_eval = None
    if evaluate:
        dense_eval = evaluate_once([os.path.join(out, "dense_eval.json"), _dense_cache(cfg, source, dtype)],
                                   lambda: _evaluate_dense(model, tokenizer, cfg), state, every_process=cfg.fsdp)
    probe = {}
    try:
        plan = search_plan(model, blocks, target_params=target, config=method, run=cfg.run_settings(), run_dir=out,
                           resume=cfg.resume, source_model=cfg.model or "smollm2-135m",
                           verbose=state.is_main_process, probe_out=probe)
    except Stopped as e:
        if state.is_main_process:
            print(f"stopped at step {e.step}/{e.total}; checkpoint saved. Continue with the same command plus --resume")
        return {"summary": {"finished": False, "step": e.step}}
    plan.metadata.search, plan.metadata.command = record(cfg), command  # the card shows the command
    card = {"settings": {k: v for k, v in record(cfg).items() if v not in (None, False, "")}}
    carry = ("metrics.jsonl", "search_config.json", "tensorboard")

    def refit(pruned_model, source_model, read_source=None):
        plan.metadata.refit = refit_output_projections(pruned_model, source_model, plan, blocks[:cfg.refit_samples],
                                                          alpha=cfg.refit_alpha, batch_size=cfg.batch_size,
                                                          select=cfg.refit_select, fill_hidden=cfg.refit_hidden == "fill",
                                                          progress=state.is_main_process, read_source=read_source)
        if len(heldout):  # recorded only: restarts rank the plain slices (the architectures; docs/CLI.md)
            plan.metadata.heldout_loss_after_refit = heldout_loss(pruned_model, heldout, cfg.batch_size)

    # The plan is the same on every rank; only the main process, which saves and evaluates, builds the pruned
    # model (and refits it): the other ranks would each hold and refit a copy for nothing.
    pruned = None
    if files is None:
        if state.is_main_process:
            pruned = prune_model(model, plan)
            score(pruned, plan, probe["probe"], probe["logits"], heldout, cfg.batch_size, say=print)
            if cfg.refit:
                refit(pruned, model)
    else:
        del model  # the search's copy of the weights goes first: the two models are never in memory together
        pruned = _prune_from_the_files(tokenizer, plan, files, out, card, carry, dtype, probe, heldout, cfg.batch_size, state,
                                       refit=refit if cfg.refit else None)
    summary = _summary(plan, dense, out, dtype, pruned_from_files=files is not None)
    if state.is_main_process:
        if files is None:
            save_into_run_folder(pruned, tokenizer, out, plan, card, source if os.path.isdir(source) else None, carry=carry,
                                 add=lambda folder: _write_json(os.path.join(folder, "search_summary.json"), summary))
        else:
            _write_json(os.path.join(out, "search_summary.json"), summary)
    state.wait_for_everyone()
    return {"summary": summary, "pruned": pruned, "tokenizer": tokenizer, "dense_eval": dense_eval}


def _summary(plan, dense: int, out: str, dtype: str, pruned_from_files: bool) -> dict:
    """search_summary.json: the budget, the result and how it was reached, from the plan's metadata."""
    meta, target = plan.metadata, plan.metadata.target_params
    summary = {"finished": True, "dense_params": dense, "target_params": target, "params": plan.params_after,
               "params_before_fit": meta.budget_fit["params_before"], "params_ratio": plan.params_after / dense,
               "budget_gap": (target - plan.params_after) / target, "search_time_s": meta.search_time_s,
               "parity_max_abs_diff": meta.masked_vs_pruned_max_abs_logit_diff, "output_dir": out,
               "num_processes": meta.num_processes, "dtype": dtype, "plan_sha256_per_rank": meta.plan_sha256_per_rank,
               "pruned_from_files": pruned_from_files, "refit": meta.refit}
    for key in ("heldout_loss", "heldout_loss_after_refit"):
        if getattr(meta, key) is not None:
            summary[key] = getattr(meta, key)
    return summary


def _load(cfg: SearchConfig, source: str, dtype: str, state, main_only: bool = False):
    """(model, tokenizer) of `cfg.model` (at `source`). Under --fsdp every process reads only its shard from
    the files (`load_sharded`: no process holds the whole model); otherwise the whole model, on every
    process, or with `main_only` on the main one alone ((None, None) elsewhere)."""
    from ..checkpoints.loading import load_model_and_tokenizer, load_tokenizer, local_model_folder

    if cfg.fsdp:
        from ..checkpoints.sharded import load_sharded

        with state.main_process_first():  # the embedded default is converted to files once, by the first process
            folder = local_model_folder(cfg.model)
        return load_sharded(folder, dtype), load_tokenizer(folder, cfg.model or source)
    if main_only:  # no barrier here: the other processes are not loading
        return load_model_and_tokenizer(cfg.model, dtype=dtype) if state.is_main_process else (None, None)
    with state.main_process_first():  # the first process converts/caches, the others reuse
        return load_model_and_tokenizer(cfg.model, dtype=dtype)


def _prune_from_files(cfg: SearchConfig, source: str) -> str | None:
    """The folder whose safetensors files the pruned checkpoint is written from (--prune-from-files), or
    None to prune a copy in memory. Only frozen weights are the files' weights."""
    if cfg.prune_from_files == "never" or cfg.train_weights != "none":
        return None
    if cfg.fsdp:  # the sharded weights are never gathered into one model: the files are the only whole copy
        return _prune_from_files(dataclasses.replace(cfg, fsdp=False, prune_from_files="always"), source)
    from ..checkpoints.loading import local_model_folder
    from ..checkpoints.weights import INDEX_NAME, WEIGHTS_NAME

    try:
        folder = local_model_folder(source)
    except FileNotFoundError:  # neither a folder nor in the local Hub cache: there are no files to prune from
        folder = None
    sharded = folder is not None and os.path.isfile(os.path.join(folder, INDEX_NAME))
    if cfg.prune_from_files == "auto":
        return folder if sharded else None
    if not (sharded or (folder is not None and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)))):
        raise ConfigError(f"--prune-from-files always: {cfg.model or source} has no safetensors files to prune from")
    return folder


def _prune_from_the_files(tokenizer, plan, files, out, card, carry, dtype, probe, heldout, batch_size, state,
                          refit=None):
    """On the main process: write the checkpoint from the source files (memory: one shard) into the run
    folder and score it (parity with the masked model, held-out loss) as written, one layer at a time
    (`streamed`: never the whole pruned model), recording both in its plan; returns None. With
    `refit(pruned, source, read_source)` the pruned model is read back whole (the refit changes it; its
    source is read from the files one pass's sublayers at a time), scored, refit, saved over the sliced
    one and returned (None on the other processes)."""
    import gc

    from transformers import AutoConfig, AutoModelForCausalLM

    from ..checkpoints.loading import _torch_dtype
    from ..checkpoints.save import DEFAULT_MAX_SHARD_SIZE
    from ..checkpoints.stream_prune import prune_checkpoint, source_structure
    from ..checkpoints.weights import WeightFiles
    from ..streamed import skeleton, streamed
    from ..training.dms import score
    from .folder import save_into_run_folder

    gc.collect()
    pruned = None
    if state.is_main_process:
        def say(*args):
            print(*args, flush=True)

        say(f"writing the pruned checkpoint from the files of {files}")

        def save(model_, tok, out_dir, plan_, info, source_dir, write_weights):
            save_into_run_folder(model_, tok, out_dir, plan_, info, source_dir, carry=carry, write_weights=write_weights)

        prune_checkpoint(plan, files, out, dtype=dtype, max_shard_size=DEFAULT_MAX_SHARD_SIZE, model_card_info=card,
                         tokenizer=tokenizer, save=save)
        if refit is not None:  # the refit changes the pruned model's weights: it needs them all in memory
            pruned = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(probe["probe"].device).eval()
            score(pruned, plan, probe["probe"], probe["logits"], heldout, batch_size, say=say)
            source, source_files = source_structure(files, pruned.dtype)
            refit(pruned, source, source_files.read)
            save_into_run_folder(pruned, tokenizer, out, plan, card, files, carry=carry)
        else:  # measured on the written checkpoint, read one layer at a time: add it to its plan
            from ..checkpoints.save import PLAN_FILE

            written = skeleton(AutoConfig.from_pretrained(out), _torch_dtype(dtype))
            with streamed(written, WeightFiles(out).read, probe["probe"].device):
                score(written, plan, probe["probe"], probe["logits"], heldout, batch_size, say=say)
            # The plan written above, now with the scores in its record (its counts are the saved model's: the
            # same formula), replaces the file: nothing is read back from disk.
            plan.to_json(os.path.join(out, PLAN_FILE))
    state.wait_for_everyone()
    return pruned


def _write_json(path: str, obj) -> None:
    from ..files import write_json_atomic

    write_json_atomic(path, obj)


def _evaluate_dense(model, tokenizer, cfg: SearchConfig) -> dict:
    from .folder import evaluate

    return evaluate(model, tokenizer, cfg, name=cfg.model or "smollm2-135m")


def _dense_cache(cfg: SearchConfig, source: str, dtype: str) -> str | None:
    """The dense evaluation in the user cache, keyed by the model files (sizes, mtimes) and every
    evaluation setting, so later runs reuse it; Hub ids are not cached."""
    if not os.path.isdir(source):
        return None
    from ..files import cache_root

    files = sorted((f, os.path.getsize(os.path.join(source, f)), int(os.path.getmtime(os.path.join(source, f))))
                   for f in os.listdir(source) if f.endswith((".safetensors", ".json")))
    key = {"source": os.path.realpath(source), "files": files, "dtype": f"torch.{dtype}", "ppl": cfg.eval_ppl,
           "protocol": cfg.eval_protocol, "max_windows": cfg.eval_max_windows, "tasks": cfg.eval_tasks,
           "limit": cfg.eval_limit, "data_dir": cfg.data_dir, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_root(), "dense_eval", f"{digest}.json")

