"""The run behind `dms-llm finetune`: its configuration (`FinetuneConfig`, also its recipe format and its
record) and `run`, which fine-tunes a pruned checkpoint (`dms_llm.training.recovery.recover`) and saves,
evaluates and pushes it as one run folder. `dms_llm.cli.finetune` reads the command line into a
`FinetuneConfig`; the benchmark's recovery rows run the same `run` on the recipe they write.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

from ..files import read_json
from ..markdown import table
from ..training.engine import METRICS_FILE, has_checkpoint, process_state
from ..training.recovery import SCHEDULES, RecoveryConfig
from .folder import RunOptions, changed_settings, check_resume
from .options import ConfigError, data_dir_default, option, part, record
from .options import load_recipe as _load_recipe

STATE_DIR = "finetune_state"
CONFIG_FILE = "finetune_config.json"
PLAN_FILE = "dms_plan.json"
# A folder that holds one of these is a checkpoint or a fine-tuning run: --overwrite may replace it.
RUN_MARKERS = ("config.json", PLAN_FILE, CONFIG_FILE, STATE_DIR)
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


@dataclass
class FinetuneConfig(RunOptions, RecoveryConfig):
    """`dms-llm finetune`: the training (`RecoveryConfig`, its length and schedule resolved here), the run
    (`RunOptions`) and what the command adds: the checkpoint, the teacher, the data and the output."""

    HIDDEN: ClassVar[tuple] = ("fsdp",)  # the recovery trains every weight of one replicated model
    HELP: ClassVar[dict] = {
        "method": "lora (adapters on every projection, merged at the end) or full (every weight)",
        "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping (global L2 norm)",
        "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (the update is scaled by alpha / r)",
        "lora_dropout": "dropout on the LoRA branch input",
        "distill_weight": "weight of KL(teacher || student); 0 disables the teacher (not loaded)",
        "distill_temperature": "distillation temperature T (the KL is scaled by T^2)",
        "ce_weight": "weight of the next-token cross-entropy; 0: distillation only (needs the teacher)",
        "schedule": "learning rate after the warmup: constant, or cosine (decays to --min-lr-ratio x --lr at the last step)",
        "min_lr_ratio": "the cosine schedule's final learning rate, as a fraction of --lr"}
    # Settings a resumed run must share with the run it continues (the checkpoint means nothing otherwise).
    RESUME: ClassVar[tuple] = RunOptions.RESUME + ("model", "teacher", "method", "lora_r", "lora_alpha", "lora_dropout",
                                                   "distill_weight", "ce_weight", "schedule", "steps_resolved")
    # ... and a run that continues another (--continue-from) must share every setting its steps depend on but the
    # length: the data order and the learning rate are functions of the step, so the shorter run's steps are its own.
    CONTINUE: ClassVar[tuple] = tuple(k for k in RESUME if k != "steps_resolved") + (
        "lr", "warmup_resolved", "weight_decay", "max_grad_norm", "distill_temperature", "mixed_precision")

    model: str | None = option(None, "the pruned checkpoint folder to fine-tune (holds dms_plan.json)")
    teacher: str | None = option(None, "dense model for distillation: folder, Hub id or alias; default: the plan's source model")
    output_dir: str | None = option(None, "where the fine-tuned checkpoint, metrics and results go")
    steps: int | None = option(None, "optimiser steps (give this, --epochs or --max-tokens; none: one epoch)")
    epochs: float | None = option(None, "passes over the --num-samples blocks (may be fractional)")
    max_tokens: int | None = option(None, "token budget: as many steps as it takes to train on this many tokens "
                                          "(blocks repeat once it exceeds --num-samples x --seq-len)")
    lr: float | None = option(None, "peak learning rate (default: 2e-4 for lora, 2e-5 for full)")
    warmup_steps: int | None = option(None, "linear warmup steps, then the --schedule (default: 10%% of the steps, at most 20)")
    dataset: str = option("default", "training text: default (C4 train sample), c4, wikitext2, ptb, alpaca, or a file/folder")
    num_samples: int = option(512, "training blocks (one epoch = this many blocks)")
    overwrite: bool = option(False, "replace an existing --output-dir that holds a checkpoint or a fine-tuning run")
    keep_state: bool = option(False, "keep the final training state (finetune_state: the trained weights, the optimiser "
                                     "and the random state) in the saved folder, so that a longer run can --continue-from it")
    continue_from: str | None = option(None, "a finished, shorter run of the same recipe saved with --keep-state: start "
                                             "from its final state, as if this run had trained that far itself (constant "
                                             "--schedule only: a cosine depends on the run's length)")

    def __post_init__(self):
        if not self.model:
            raise ConfigError("give --model, the pruned checkpoint folder to fine-tune (the --output-dir of dms-llm search)")
        if self.output_dir is None:
            raise ConfigError("give --output-dir (where the fine-tuned checkpoint goes)")
        if self.method not in ("lora", "full"):
            raise ConfigError(f"--method must be lora or full, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be {' or '.join(SCHEDULES)}, got {self.schedule!r}")
        super().__post_init__()
        lengths = [f"--{name.replace('_', '-')}" for name in ("steps", "epochs", "max_tokens") if getattr(self, name) is not None]
        if len(lengths) > 1:
            raise ConfigError(f"give one of --steps, --epochs and --max-tokens, not both {' and '.join(lengths[:2])}")
        for name in ("steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        for name in ("num_samples", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        checks = [("lr", self.lr > 0), ("distill_weight", self.distill_weight >= 0), ("distill_temperature", self.distill_temperature > 0),
                  ("max_grad_norm", self.max_grad_norm > 0), ("weight_decay", self.weight_decay >= 0),
                  ("lora_dropout", 0 <= self.lora_dropout < 1), ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0),
                  ("ce_weight", self.ce_weight >= 0), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} is out of range: {getattr(self, name)}")
        if self.ce_weight == 0 and self.distill_weight == 0:
            raise ConfigError("--ce-weight 0 trains on distillation alone: it needs the teacher (--distill-weight > 0)")


# ----- command line and recipes -------------------------------------------------------------------
def load_recipe(path: str) -> dict:
    return _load_recipe(path, FinetuneConfig)


# ----- checks before any compute ------------------------------------------------------------------
def check_pruned_dir(cfg: FinetuneConfig):
    from ..plan import PrunePlan

    pruned = os.path.abspath(os.path.expanduser(cfg.model))
    if not os.path.isdir(pruned):
        raise ConfigError(f"--model {pruned} does not exist; give the folder of a pruned checkpoint (the --output-dir of dms-llm search)")
    if not os.path.isfile(os.path.join(pruned, PLAN_FILE)):
        raise ConfigError(
            f"--model {pruned} has no {PLAN_FILE}: it is not a dms_llm pruned checkpoint. Fine-tune a folder written "
            "by dms-llm search or save_pruned (the plan is needed to save the result in the same format)"
        )
    if not os.path.isfile(os.path.join(pruned, "config.json")):
        raise ConfigError(f"--model {pruned} has {PLAN_FILE} but no config.json: an incomplete checkpoint")
    return pruned, PrunePlan.from_json(os.path.join(pruned, PLAN_FILE))


def teacher_name(cfg: FinetuneConfig, plan) -> str | None:
    if cfg.distill_weight == 0:
        return None
    name = cfg.teacher or plan.source_model
    if not name:
        raise ConfigError("distillation needs a teacher: give --teacher (the dense model), or --distill-weight 0 to train without one")
    return name


def check_vocabularies(student_dir: str, teacher_source: str, teacher_label: str) -> None:
    """The KL compares distributions token by token: both models must share vocabulary and ids.
    Checked from configs and tokenizers alone, before any weights are loaded."""
    from transformers import AutoConfig, AutoTokenizer

    from .. import modeling

    modeling.register_auto_classes()
    try:
        s_cfg, t_cfg = AutoConfig.from_pretrained(student_dir), AutoConfig.from_pretrained(teacher_source)
        s_tok, t_tok = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_source)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read the config and tokenizer of the teacher {teacher_label!r} or the student: {str(e).splitlines()[0][:300]}") from e
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ConfigError(
            f"the teacher {teacher_label!r} has vocab_size {t_cfg.vocab_size} but the student {student_dir} has "
            f"{s_cfg.vocab_size}: distillation needs the same vocabulary; pass the dense model the checkpoint was "
            "pruned from as --teacher, or --distill-weight 0"
        )
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(k for k in set(s_vocab) | set(t_vocab) if s_vocab.get(k) != t_vocab.get(k))
        example = differing[0]
        raise ConfigError(
            f"the tokenizers of the teacher {teacher_label!r} and the student {student_dir} differ in {len(differing)} "
            f"token(s) (e.g. {example!r}: id {t_vocab.get(example)} vs {s_vocab.get(example)}); distillation needs the "
            "same vocabulary; pass the dense model the checkpoint was pruned from as --teacher, or --distill-weight 0"
        )


def resolve_steps(cfg: FinetuneConfig, num_processes: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum * num_processes
    if cfg.max_tokens is not None:  # the last step is whole: the run trains on at least max_tokens
        return math.ceil(cfg.max_tokens / (per_step * cfg.seq_len))
    return max(1, math.ceil((cfg.epochs if cfg.epochs is not None else 1.0) * cfg.num_samples / per_step))


def resolve_warmup(cfg: FinetuneConfig, steps: int) -> int:
    return warmup_of(cfg.warmup_steps, steps)


def warmup_of(warmup_steps: int | None, steps: int) -> int:
    return warmup_steps if warmup_steps is not None else min(20, steps // 10)


def recovery_config(cfg: FinetuneConfig, steps: int) -> RecoveryConfig:
    return part(cfg, RecoveryConfig, steps=steps, warmup_steps=resolve_warmup(cfg, steps))


def check_continue(cfg: FinetuneConfig, steps: int) -> tuple[str, int] | None:
    """(the folder of the run a --continue-from run continues, the step it starts at: that run's steps), once
    the run is known to be one this run can continue; None without --continue-from. Checked before anything
    is loaded."""
    if not cfg.continue_from:
        return None
    src = os.path.abspath(os.path.expanduser(cfg.continue_from))
    how = "rerun the shorter one with --keep-state, or drop --continue-from to train from the start"
    if not (os.path.isfile(os.path.join(src, "finetune_summary.json")) and os.path.isfile(os.path.join(src, CONFIG_FILE))):
        raise ConfigError(f"--continue-from {src} is not a finished fine-tuning run (no finetune_summary.json); {how}")
    if not has_checkpoint(os.path.join(src, STATE_DIR)):
        raise ConfigError(f"--continue-from {src} kept no training state ({STATE_DIR}); {how}")
    saved = read_json(os.path.join(src, CONFIG_FILE))
    if cfg.schedule != "constant" or saved.get("schedule", "constant") != "constant":
        raise ConfigError("--continue-from needs --schedule constant in both runs: a cosine's learning rate at each step "
                          "depends on the run's length, so the shorter run's steps are not this run's")
    done = int(saved["steps_resolved"])
    if done > steps:
        raise ConfigError(f"--continue-from {src} trained {done} steps, more than this run's {steps}: give a longer "
                          "--steps or --max-tokens")
    saved = saved | {"model": os.path.abspath(saved.get("model") or ""),
                     "warmup_resolved": saved.get("warmup_resolved", warmup_of(saved.get("warmup_steps"), done))}
    was = changed_settings(cfg, saved, cfg.CONTINUE, {"model": os.path.abspath(cfg.model),
                                                      "warmup_resolved": resolve_warmup(cfg, steps)})
    if was:
        raise ConfigError(f"--continue-from: {src} was trained with {was}; continue it with the same settings")
    return src, done


# ----- the command --------------------------------------------------------------------------------
def run(cfg: FinetuneConfig, command: str = "dms-llm finetune") -> dict:
    from ..checkpoints.loading import load_model_and_tokenizer, resolve_model, training_dtype
    from ..data import load_calibration
    from ..training.engine import Stopped
    from ..training.recovery import recover
    from .folder import check_output_dir, evaluate, evaluate_after, evaluate_once, push, report, start_run_folder

    out = os.path.abspath(cfg.output_dir)
    pruned_dir, plan = check_pruned_dir(cfg)
    teacher = teacher_name(cfg, plan)
    teacher_source = resolve_model(teacher) if teacher else None
    protected = {"pruned checkpoint folder": pruned_dir}
    if teacher_source and os.path.isdir(teacher_source):
        protected["teacher folder"] = teacher_source
    check_output_dir(out, cfg.overwrite, cfg.resume, has_checkpoint(os.path.join(out, STATE_DIR)), protected, RUN_MARKERS)
    if teacher_source:
        check_vocabularies(pruned_dir, teacher_source, teacher)

    state = process_state()
    say = lambda *a: state.is_main_process and print(*a, flush=True)  # noqa: E731
    steps = resolve_steps(cfg, state.num_processes)
    check_resume(cfg, out, CONFIG_FILE, {"steps_resolved": steps})
    continued = check_continue(cfg, steps)
    continuing = continued is not None and not cfg.resume  # a resumed continuation has its own, later, checkpoint
    dtype = training_dtype(cfg.dtype)
    say(f"loading the pruned model {pruned_dir} as {dtype}")
    model, tokenizer = load_model_and_tokenizer(pruned_dir, dtype=dtype)
    with state.main_process_first():
        blocks = load_calibration(cfg.dataset, tokenizer, cfg.seq_len, cfg.num_samples, seed=cfg.seed,
                                  text_field=cfg.text_field, data_dir=data_dir_default(cfg.data_dir))
    teacher_model = None
    if teacher_source:
        say(f"loading the teacher {teacher} as {dtype} (a second full model in memory)")
        with state.main_process_first():  # the first process converts/caches, the others reuse
            teacher_model, _ = load_model_and_tokenizer(teacher, dtype=dtype)
        teacher_model.requires_grad_(False).eval().to(state.device)
    elif cfg.teacher:
        say("--distill-weight 0: the teacher is not loaded")

    if state.is_main_process:
        start_run_folder(out, cfg.overwrite and not cfg.resume, record(cfg) | {
            "steps_resolved": steps, "warmup_resolved": resolve_warmup(cfg, steps), "teacher_resolved": teacher},
                         CONFIG_FILE, stale=(STATE_DIR, "before_eval.json", "lora_adapter"))
        if continuing:  # its state, and its steps' metrics: this run's summary covers every step from the first
            src = continued[0]
            shutil.copytree(os.path.join(src, STATE_DIR), os.path.join(out, STATE_DIR))
            shutil.copy2(os.path.join(src, METRICS_FILE), os.path.join(out, METRICS_FILE))
    state.wait_for_everyone()

    before = None
    if not cfg.no_eval:
        before = reusable_results(pruned_dir, cfg, model) or evaluate_once(
            [os.path.join(out, "before_eval.json")], lambda: evaluate(model, tokenizer, cfg, name=pruned_dir), state)
    try:
        result = recover(model, blocks, recovery_config(cfg, steps), cfg.run_settings(), teacher=teacher_model, run_dir=out,
                         resume=cfg.resume or continuing, verbose=state.is_main_process)
    except Stopped as e:
        say(f"stopped at step {e.step}/{e.total}; checkpoint saved. Continue with the same command plus --resume")
        return {"finished": False, "step": e.step}
    model = result.model
    del teacher_model  # free it before saving

    summary = _summary(cfg, result, steps, teacher, pruned_dir, out, dtype, state)
    if continued is not None:  # the time of the steps it continued, so that train_time_s is the whole run's
        src, continued_at = continued
        summary.update(continued_from=src, continued_at_step=continued_at,
                       train_time_s=summary["train_time_s"] + read_json(os.path.join(src, "finetune_summary.json"))["train_time_s"])
    if state.is_main_process:
        say(f"fine-tuned {steps} steps in {result.train_time_s:.0f} s; loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
            + (f"; merged vs LoRA logits max diff {result.merge_max_abs_diff:.2e}" if result.merge_max_abs_diff is not None else ""))
        _save(model, tokenizer, plan, cfg, out, pruned_dir, summary, command)
    state.wait_for_everyone()
    if not cfg.no_eval and state.is_main_process:
        from ..files import write_json_atomic

        summary["results"] = evaluate_after(model, tokenizer, cfg, out, before)
        write_json_atomic(os.path.join(out, "finetune_summary.json"), summary)
    push(cfg, out, summary, state)
    if state.is_main_process:
        report(summary, before, f"fine-tuned: {summary['method']}, {summary['steps']} steps, {summary['train_time_s']:.0f} s; "
                                f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")
    return summary


def _summary(cfg: FinetuneConfig, result, steps: int, teacher, pruned_dir: str, out: str, dtype: str, state) -> dict:
    """finetune_summary.json: what was trained, on what, how long, and the loss at the start and the end."""
    from ..data import describe_dataset

    metrics = []
    if state.is_main_process:
        with open(os.path.join(out, METRICS_FILE)) as f:
            metrics = [json.loads(line) for line in f]
    window = max(1, min(10, len(metrics) // 2))  # first and last steps are averaged: single steps are noisy
    per_step = cfg.batch_size * cfg.grad_accum * state.num_processes
    return {
        "finished": True, "method": cfg.method, "pruned_model": pruned_dir, "teacher": teacher,
        "distill_weight": cfg.distill_weight if teacher else 0.0, "distill_temperature": cfg.distill_temperature,
        "ce_weight": cfg.ce_weight, "max_tokens": cfg.max_tokens,  # tokens: what was trained on, >= max_tokens
        "steps": steps, "epochs": steps * per_step / cfg.num_samples, "tokens": steps * per_step * cfg.seq_len,
        "lr": cfg.lr, "warmup_steps": resolve_warmup(cfg, steps), "schedule": cfg.schedule, "min_lr_ratio": cfg.min_lr_ratio,
        "max_grad_norm": cfg.max_grad_norm,
        "data": _describe_data(describe_dataset, cfg, data_dir_default(cfg.data_dir)),
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": result.lora_targets}
        if cfg.method == "lora" else None,
        "params": sum(p.numel() for p in result.model.parameters()), "trainable_params": result.trainable_params,
        "loss_window": window,
        "loss_first": _mean([m["loss"] for m in metrics[:window]]), "loss_last": _mean([m["loss"] for m in metrics[-window:]]),
        "task_loss_first": _mean([m["task_loss"] for m in metrics[:window]]),
        "task_loss_last": _mean([m["task_loss"] for m in metrics[-window:]]),
        "train_time_s": result.train_time_s, "merge_max_abs_diff": result.merge_max_abs_diff, "output_dir": out,
        "num_processes": state.num_processes, "dtype": dtype, "mixed_precision": cfg.mixed_precision,
    }


def reusable_results(pruned_dir: str, cfg: FinetuneConfig, model) -> dict | None:
    """The pruned checkpoint's own results.json as the 'before' row, when it measured exactly what this
    run will measure (same datasets, protocol, windows, tasks, limit, dtype): saves one evaluation."""
    from ..evaluation import PPL_DATASETS, check_ppl_datasets, check_protocols, check_tasks

    path = os.path.join(pruned_dir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    results = {k: v for k, v in results.items() if k != "baseline"}
    want_ppl = set()
    for name in check_ppl_datasets(cfg.eval_ppl):
        labels = {name, PPL_DATASETS[name].local_label} - {None}
        got = labels & set(results.get("ppl", {}))
        if len(got) != 1:
            return None
        want_ppl.add(got.pop())
    same = (
        set(results.get("ppl", {})) == want_ppl
        and all(set(v) == set(check_protocols(cfg.eval_protocol)) for v in results.get("ppl", {}).values())
        and set(results.get("zero_shot", {})) == set(check_tasks(cfg.eval_tasks))
        and results.get("max_windows") == cfg.eval_max_windows
        and results.get("limit") == (cfg.eval_limit if cfg.eval_tasks else results.get("limit"))
        and results.get("params") == sum(p.numel() for p in model.parameters())
        and results.get("dtype") == str(next(model.parameters()).dtype).removeprefix("torch.")
    )
    if not same:
        return None
    results["reused_from"] = path
    return results


def _describe_data(describe_dataset, cfg: FinetuneConfig, data_dir: str) -> dict:
    try:
        info = describe_dataset(cfg.dataset, data_dir=data_dir, text_field=cfg.text_field)
    except (OSError, ValueError) as e:  # provenance is a courtesy; the data itself loaded fine
        return {"dataset": cfg.dataset, "error": str(e)}
    info.pop("files", None)
    return info | {"seq_len": cfg.seq_len, "num_samples": cfg.num_samples}


def _mean(values):
    return sum(values) / len(values) if values else None


def card_section(summary: dict) -> str:
    """The model card's fine-tuning section (Markdown)."""
    data = summary["data"]
    source = data.get("note") or data.get("source") or data.get("dataset")
    rows = [
        ("method", "LoRA (merged into the weights)" if summary["method"] == "lora" else "full fine-tuning"),
        ("starting point", f"`{summary['pruned_model']}` (the pruned checkpoint)"),
        ("steps", f"{summary['steps']} ({summary['epochs']:.2f} epochs, {summary['tokens']:,} tokens)"),
        ("data", f"{data.get('dataset')}: {source} ({data.get('num_samples')} blocks of {data.get('seq_len')} tokens)"),
        ("teacher", f"`{summary['teacher']}`" if summary["teacher"] else "none"),
        ("distillation", f"weight {summary['distill_weight']}, temperature {summary['distill_temperature']}" if summary["teacher"] else "off"),
        ("cross-entropy", f"weight {summary['ce_weight']}" if summary["ce_weight"] else "off (distillation only)"),
        ("learning rate", f"{summary['lr']:g}, AdamW, {summary['warmup_steps']} warmup steps then {_decay(summary)}, "
                          f"gradient clipping at {summary['max_grad_norm']}"),
        (f"loss (mean of the first -> last {summary['loss_window']} steps)", f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}"),
        ("time", f"{summary['train_time_s']:.0f} s on {summary['num_processes']} process(es), {summary['dtype']}"),
    ]
    if summary.get("lora"):
        lora = summary["lora"]
        rows.insert(1, ("LoRA", f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on {', '.join(lora['targets'])}"))
    return ("## Fine-tuning\n\nAfter pruning, the weights were fine-tuned to recover quality (`dms-llm finetune`); "
            "the architecture is unchanged.\n\n" + "\n".join(table(["", ""], rows)))


def _decay(summary: dict) -> str:
    return "constant" if summary["schedule"] == "constant" else f"cosine decay to {summary['min_lr_ratio']:g} x that at the last step"


def _save(model, tokenizer, plan, cfg, out, pruned_dir, summary, command) -> None:
    """Save the checkpoint into `out` (the same format as the pruned one), keeping the run's files beside it."""
    from ..files import write_json_atomic
    from .folder import save_into_run_folder

    record = plan.metadata  # the pruned checkpoint's: its search, and the command that made it
    record.finetune = {k: summary[k] for k in ("method", "steps", "teacher", "distill_weight", "lr", "train_time_s")} | {
        "data": summary["data"].get("dataset"), "pruned_model": pruned_dir}
    record.then(command)  # the card's "How it was made": the pruning command, then this one
    card = {"description": card_section(summary),
            "settings": {k: v for k, v in (record.search or {}).items() if v not in (None, False, "")},
            "tags": ["fine-tuned"] + (["lora"] if cfg.method == "lora" else []) + (["knowledge-distillation"] if summary["teacher"] else [])}
    save_into_run_folder(model, tokenizer, out, plan, card, pruned_dir,
                         carry=("metrics.jsonl", CONFIG_FILE, "tensorboard", "lora_adapter") + ((STATE_DIR,) if cfg.keep_state else ()),
                         add=lambda folder: write_json_atomic(os.path.join(folder, "finetune_summary.json"), summary))

