"""Recover a pruned checkpoint's quality by fine-tuning it, optionally distilling from the dense model.

    accelerate launch dms_llm/finetune.py --model runs/smollm2-80 --teacher smollm2-135m --output-dir runs/smollm2-80-ft
    python dms_llm/finetune.py --config recipes/finetune/smollm2-135m-recover.yaml --model runs/smollm2-80 --output-dir runs/ft

`--model` is a folder written by `dms_llm/search.py` (or `save_pruned`): it must hold `dms_plan.json`. The
result is saved exactly like a pruning checkpoint (same plan, same format: stock or `dms_llama` with its
modeling code), so both loading paths keep working, with a fine-tuning section in the model card.

Training: LoRA on every projection present (q/k/v/o/gate/up/down; a `dms_llama` layer without a sublayer
simply has fewer) or all weights (`--method full`); AdamW, a linear warmup over `--warmup-steps` then a
constant learning rate, gradient clipping at `--max-grad-norm`. Loss per token: cross-entropy on the
next token + `--distill-weight` x KL(teacher || student) at `--distill-temperature` (scaled by T^2).
Memory: the teacher is a second full model in memory (same dtype, no gradients, no optimiser state); with
`--distill-weight 0` it is not loaded. Options and recipe keys are the fields of `FinetuneConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # `python dms_llm/finetune.py` and `accelerate launch dms_llm/finetune.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dms_llm.cli import ConfigError, option, run_main  # noqa: E402
from dms_llm.cli import load_recipe as _load_recipe  # noqa: E402
from dms_llm.cli import parse_config as _parse_config  # noqa: E402

STATE_DIR = "finetune_state"
STATE_FILE = "state.pt"
SETTINGS_FILE = "settings.json"
PLAN_FILE = "dms_plan.json"
# A folder that holds one of these is a checkpoint or a fine-tuning run: --overwrite may replace it.
RUN_MARKERS = ("config.json", PLAN_FILE, "finetune_config.json", STATE_DIR)
# Settings a resumed run must share with the run it continues (the checkpoint means nothing otherwise).
RESUME_KEYS = ("model", "teacher", "method", "lora_r", "lora_alpha", "lora_dropout", "dataset", "text_field",
               "seq_len", "num_samples", "batch_size", "grad_accum", "seed", "dtype", "distill_weight", "steps_resolved")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


@dataclass
class FinetuneConfig:
    model: str | None = option(None, "the pruned checkpoint folder to fine-tune (holds dms_plan.json)")
    teacher: str | None = option(None, "dense model for distillation: folder, Hub id or alias; default: the plan's source model")
    output_dir: str | None = option(None, "where the fine-tuned checkpoint, metrics and results go")
    method: str = option("lora", "lora (adapters on every projection, merged at the end) or full (every weight)")
    distill_weight: float = option(1.0, "weight of KL(teacher || student); 0 disables the teacher (not loaded)")
    distill_temperature: float = option(1.0, "distillation temperature T (the KL is scaled by T^2)")
    steps: int | None = option(None, "optimiser steps (give this or --epochs; neither: one epoch)")
    epochs: float | None = option(None, "passes over the --num-samples blocks (may be fractional)")
    lr: float | None = option(None, "peak learning rate (default: 2e-4 for lora, 2e-5 for full)")
    warmup_steps: int | None = option(None, "linear warmup steps, then constant (default: 10%% of the steps, at most 20)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping (global L2 norm)")
    dataset: str = option("default", "training text: default (C4 train sample), c4, wikitext2, ptb, alpaca, or a file/folder")
    text_field: str = option("text", "field holding the text in .json/.jsonl/.parquet data")
    data_dir: str | None = option(None, "offline data folder (default: $DMS_DATA_DIR or ../shared/data)")
    seq_len: int = option(256, "tokens per training block")
    num_samples: int = option(512, "training blocks (one epoch = this many blocks)")
    batch_size: int = option(1, "blocks per micro-batch and process")
    grad_accum: int = option(1, "micro-batches per step")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA branch input")
    mixed_precision: str = option("no", "no, bf16 or fp16 (autocast through Accelerate)")
    dtype: str = option("auto", "weights dtype of student and teacher: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    seed: int = option(0, "seed of data order, LoRA init, dropout")
    checkpoint_every: int = option(50, "checkpoint every N steps (and on Ctrl-C)")
    stop_after: int | None = option(None, "checkpoint and stop after this many steps (continue with --resume)")
    resume: bool = option(False, "continue from the checkpoint in --output-dir")
    overwrite: bool = option(False, "replace an existing --output-dir that holds a checkpoint or a fine-tuning run")
    no_eval: bool = option(False, "skip the before/after evaluation")
    eval_ppl: str = option("wikitext2", "held-out perplexity datasets (comma list)")
    eval_protocol: str = option("llm-pruner", "perplexity protocol: llm-pruner (128-token windows) or sparsegpt (2048)")
    eval_max_windows: int | None = option(None, "evaluate only the first N windows (None: the whole split)")
    eval_tasks: str = option("", "zero-shot tasks (comma list; empty: none)")
    eval_limit: int | None = option(None, "examples per zero-shot task")
    push_to_hub: str | None = option(None, "Hub repo id to upload the saved folder to")
    hub_private: bool = option(False, "create the Hub repo as private")

    def __post_init__(self):
        if not self.model:
            raise ConfigError("give --model, the pruned checkpoint folder to fine-tune (the --output-dir of dms_llm/search.py)")
        if self.output_dir is None:
            raise ConfigError("give --output-dir (where the fine-tuned checkpoint goes)")
        if self.method not in ("lora", "full"):
            raise ConfigError(f"--method must be lora or full, got {self.method!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give one of --steps and --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps must be at least 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        for name in ("seq_len", "num_samples", "batch_size", "grad_accum", "checkpoint_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        checks = [("lr", self.lr > 0), ("distill_weight", self.distill_weight >= 0), ("distill_temperature", self.distill_temperature > 0),
                  ("max_grad_norm", self.max_grad_norm > 0), ("weight_decay", self.weight_decay >= 0),
                  ("lora_dropout", 0 <= self.lora_dropout < 1), ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} is out of range: {getattr(self, name)}")


# ----- command line and recipes -------------------------------------------------------------------
def load_recipe(path: str) -> dict:
    return _load_recipe(path, FinetuneConfig)


def parse_config(argv=None) -> FinetuneConfig:
    return _parse_config(FinetuneConfig, argv, __doc__, exclusive=[("steps", "epochs")])


# ----- checks before any compute ------------------------------------------------------------------
def check_pruned_dir(cfg: FinetuneConfig):
    from .plan import PrunePlan

    pruned = os.path.abspath(os.path.expanduser(cfg.model))
    if not os.path.isdir(pruned):
        raise ConfigError(f"--model {pruned} does not exist; give the folder of a pruned checkpoint (the --output-dir of dms_llm/search.py)")
    if not os.path.isfile(os.path.join(pruned, PLAN_FILE)):
        raise ConfigError(
            f"--model {pruned} has no {PLAN_FILE}: it is not a dms_llm pruned checkpoint. Fine-tune a folder written "
            "by dms_llm/search.py or save_pruned (the plan is needed to save the result in the same format)"
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

    from .loading import _register_dms_classes

    _register_dms_classes()
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


def check_output_dir(cfg: FinetuneConfig, protected: dict[str, str]) -> None:
    out = os.path.realpath(os.path.abspath(cfg.output_dir))
    for what, folder in protected.items():
        src = os.path.realpath(folder)
        if out == src or out.startswith(src + os.sep):
            raise ConfigError(f"--output-dir {out} is inside the {what} {src}; choose another folder")
        if src.startswith(out + os.sep):
            raise ConfigError(f"--output-dir {out} contains the {what} {src}, which replacing it would delete; choose another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output-dir {out} exists and is not a folder")
    busy = os.path.isdir(out) and bool(os.listdir(out))
    if busy and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output-dir {out} exists and is not empty; pass --overwrite to replace it, --resume to continue it, or choose another folder")
    if cfg.resume:
        if not os.path.exists(os.path.join(out, STATE_DIR, STATE_FILE)):
            raise ConfigError(f"--resume: no checkpoint in {out}/{STATE_DIR}; run without --resume to start")
    elif busy and not any(os.path.exists(os.path.join(out, m)) for m in RUN_MARKERS):
        raise ConfigError(f"refusing to --overwrite {out}: it holds neither a checkpoint nor a fine-tuning run, and overwriting deletes it")


def resolve_steps(cfg: FinetuneConfig, num_processes: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum * num_processes
    return max(1, math.ceil((cfg.epochs if cfg.epochs is not None else 1.0) * cfg.num_samples / per_step))


def resolve_warmup(cfg: FinetuneConfig, steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(20, steps // 10)


def _resume_identity(cfg: FinetuneConfig, steps: int) -> dict:
    values = dataclasses.asdict(cfg) | {"steps_resolved": steps}
    return {k: values[k] for k in RESUME_KEYS}


def check_resume_settings(cfg: FinetuneConfig, out: str, steps: int) -> None:
    path = os.path.join(out, STATE_DIR, SETTINGS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    now = _resume_identity(cfg, steps)
    changed = [f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise ConfigError(f"--resume with different settings than the checkpoint in {out}: {'; '.join(changed)}")


# ----- the training loop --------------------------------------------------------------------------
class FinetuneLoop:
    """Runs the remaining steps; everything that decides the result (step, trainable weights, optimiser,
    RNG) is in one checkpoint and the data order is a function of (seed, step), so a resumed run
    continues exactly where an uninterrupted one would be."""

    def __init__(self, accelerator, model, trainable: dict, blocks, cfg: FinetuneConfig, steps: int, teacher,
                 state_dir: str, metrics_path: str):
        import torch

        self.acc, self.cfg, self.blocks, self.teacher = accelerator, cfg, blocks, teacher
        self.steps, self.warmup = steps, resolve_warmup(cfg, steps)
        self.state_dir, self.metrics_path = state_dir, metrics_path
        self.trainable = trainable
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.module, self.optimizer = accelerator.prepare(model, optimizer)
        self.step = 0

    def lr_at(self, step: int) -> float:
        # Set by hand each step rather than by a prepared scheduler, which Accelerate advances once per
        # process; a function of the step also makes resuming trivially exact.
        return self.cfg.lr * min(1.0, (step + 1) / (self.warmup + 1))

    # ----- checkpoints -------------------------------------------------------------------------
    def state_path(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    def save_state(self) -> None:
        from .trainer import rng_state, write_state

        if not self.acc.is_main_process:
            return
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                 "weights": {name: p.detach().cpu() for name, p in self.trainable.items()}}
        write_state(state, self.state_path())

    def load_state(self) -> bool:
        import torch

        from .trainer import set_rng_state, truncate_metrics

        if not os.path.exists(self.state_path()):
            return False
        state = torch.load(self.state_path(), map_location="cpu", weights_only=False)
        missing = set(self.trainable) ^ set(state["weights"])
        if missing:
            raise ConfigError(f"--resume: the checkpoint's trainable weights do not match this model ({len(missing)} differ, e.g. {sorted(missing)[0]})")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["weights"][name].to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if self.acc.is_main_process:
            truncate_metrics(self.metrics_path, self.step)
        return True

    # ----- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        from .trainer import accumulate_gradients

        cfg, acc = self.cfg, self.acc
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def logits_of(model):
            return lambda ids: model(input_ids=ids, use_cache=False).logits

        teacher = logits_of(self.teacher) if self.teacher is not None else None
        # cfg carries batch_size, grad_accum and seed: the same data order as the search
        totals = accumulate_gradients(acc, self.module, logits_of(self.module), teacher, self.blocks, self.step, cfg,
                                      cfg.distill_weight, cfg.distill_temperature)
        grad_norm = acc.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        return {
            "step": self.step,
            "loss": totals["task_loss"] + cfg.distill_weight * totals["distill_loss"] if self.teacher is not None else totals["task_loss"],
            **totals,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "epoch": self.step * per_step / len(self.blocks),
        }

    def run(self, progress=None) -> bool:
        """Run to the end (True) or until Ctrl-C / `stop_after` (False), checkpointing either way."""
        from .trainer import run_steps

        cfg = self.cfg
        return run_steps(self, self.steps, cfg.stop_after, cfg.checkpoint_every, cfg.batch_size * cfg.grad_accum,
                         self.metrics_path, progress)


# ----- the pipeline -------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .arch import arch_spec
    from .data import describe_dataset, load_calibration
    from .loading import load_model_and_tokenizer, resolve_model, training_dtype

    out = os.path.abspath(cfg.output_dir)
    pruned_dir, plan = check_pruned_dir(cfg)
    teacher = teacher_name(cfg, plan)
    teacher_source = resolve_model(teacher) if teacher else None
    protected = {"pruned checkpoint folder": pruned_dir}
    if teacher_source and os.path.isdir(teacher_source):
        protected["teacher folder"] = teacher_source
    check_output_dir(cfg, protected)
    if teacher_source:
        check_vocabularies(pruned_dir, teacher_source, teacher)

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    say = accelerator.print
    steps = resolve_steps(cfg, accelerator.num_processes)
    if cfg.resume:
        check_resume_settings(cfg, out, steps)
    set_seed(cfg.seed)
    dtype = training_dtype(cfg.dtype)
    say(f"loading the pruned model {pruned_dir} as {dtype}")
    model, tokenizer = load_model_and_tokenizer(pruned_dir, dtype=dtype)
    spec = arch_spec(model.config)
    with accelerator.main_process_first():
        blocks = load_calibration(cfg.dataset, tokenizer, cfg.seq_len, cfg.num_samples, seed=cfg.seed,
                                  text_field=cfg.text_field, data_dir=cfg.data_dir)
    teacher_model = None
    if teacher_source:
        say(f"loading the teacher {teacher} as {dtype} (a second full model in memory)")
        with accelerator.main_process_first():  # the first process converts/caches, the others reuse
            teacher_model, _ = load_model_and_tokenizer(teacher, dtype=dtype)
        teacher_model.requires_grad_(False).eval().to(accelerator.device)
    elif cfg.teacher:
        say("--distill-weight 0: the teacher is not loaded")

    state_dir, metrics_path = os.path.join(out, STATE_DIR), os.path.join(out, "metrics.jsonl")
    if accelerator.is_main_process:
        if cfg.overwrite and not cfg.resume and os.path.isdir(out):
            for name in (STATE_DIR, "metrics.jsonl"):  # a stale checkpoint or log must not leak in
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
        os.makedirs(state_dir, exist_ok=True)
        with open(os.path.join(out, "finetune_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"steps_resolved": steps, "teacher_resolved": teacher}, f, indent=2)
        with open(os.path.join(state_dir, SETTINGS_FILE), "w") as f:
            json.dump(_resume_identity(cfg, steps), f, indent=2)
    accelerator.wait_for_everyone()

    before = None
    if not cfg.no_eval:
        before = reusable_results(pruned_dir, cfg, model) or _before_eval(
            os.path.join(state_dir, "before_eval.json"), model, tokenizer, cfg, accelerator)

    model.requires_grad_(False)
    peft_model, trained = None, model
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = projection_types(model, spec)
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                      target_modules=targets, task_type="CAUSAL_LM"))
        trained = peft_model
    else:
        targets = None
        model.requires_grad_(True)
    trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    if cfg.gradient_checkpointing:
        # transformers 5.2x renamed it (the old name warns, and goes in v6)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_trainable = sum(p.numel() for p in trainable.values())
    say(f"{cfg.method}: {n_trainable:,} trainable parameters" + (f" on {', '.join(targets)}" if targets else "")
        + f"; {steps} steps of {cfg.batch_size * cfg.grad_accum * accelerator.num_processes} x {cfg.seq_len} tokens")

    loop = FinetuneLoop(accelerator, trained, trainable, blocks, cfg, steps, teacher_model, state_dir, metrics_path)
    if cfg.resume and loop.load_state():
        say(f"resumed at step {loop.step}/{steps}")
    start = time.time()
    finished = loop.run(progress=_progress_bar(accelerator, steps, loop.step))
    if not finished:
        say(f"stopped at step {loop.step}/{steps}; checkpoint saved. Continue with the same command plus --resume")
        return {"finished": False, "step": loop.step}
    train_time = time.time() - start

    # prepare() patched forward with autocast under --mixed-precision: unwrap, so that the parity probe,
    # the merge and the evaluation below all run at the weights' own precision
    trained = accelerator.unwrap_model(loop.module, keep_fp32_wrapper=False)
    if peft_model is None:
        model = trained
    del teacher_model, loop  # the teacher and the optimiser state are no longer needed: free them before saving
    probe = blocks[:1].to(accelerator.device)
    trained.eval()
    parity = None
    with torch.no_grad():
        trained_logits = trained(input_ids=probe, use_cache=False).logits.float()
    if peft_model is not None:
        if accelerator.is_main_process:
            peft_model.save_pretrained(os.path.join(state_dir, "lora_adapter"))
        model = peft_model.merge_and_unload()
        with torch.no_grad():
            parity = float((model(input_ids=probe, use_cache=False).logits.float() - trained_logits).abs().max())
    if cfg.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval().requires_grad_(False)

    metrics = _read_metrics(metrics_path) if accelerator.is_main_process else []
    window = max(1, min(10, len(metrics) // 2))  # first and last steps are averaged: single steps are noisy
    data = _describe_data(describe_dataset, cfg)
    summary = {
        "finished": True, "method": cfg.method, "pruned_model": pruned_dir, "teacher": teacher,
        "distill_weight": cfg.distill_weight if teacher else 0.0, "distill_temperature": cfg.distill_temperature,
        "steps": steps, "epochs": steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes / cfg.num_samples,
        "tokens": steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes * cfg.seq_len,
        "lr": cfg.lr, "warmup_steps": resolve_warmup(cfg, steps), "max_grad_norm": cfg.max_grad_norm, "data": data,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": targets} if peft_model is not None else None,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": n_trainable,
        "loss_window": window,
        "loss_first": _mean([m["loss"] for m in metrics[:window]]), "loss_last": _mean([m["loss"] for m in metrics[-window:]]),
        "task_loss_first": _mean([m["task_loss"] for m in metrics[:window]]), "task_loss_last": _mean([m["task_loss"] for m in metrics[-window:]]),
        "train_time_s": train_time, "merge_max_abs_diff": parity, "output_dir": out,
        "num_processes": accelerator.num_processes, "dtype": dtype, "mixed_precision": cfg.mixed_precision,
    }
    if accelerator.is_main_process:  # only the main process reads the metrics log
        say(f"fine-tuned {steps} steps in {train_time:.0f} s; loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
            + (f"; merged vs LoRA logits max diff {parity:.2e}" if parity is not None else ""))

    if accelerator.is_main_process:
        _save(model, tokenizer, plan, cfg, out, pruned_dir, summary)
    accelerator.wait_for_everyone()
    if not cfg.no_eval and accelerator.is_main_process:
        summary["results"] = _evaluate_after(model, tokenizer, cfg, out, before)
        _write_summary(out, summary)
    if cfg.push_to_hub and accelerator.is_main_process:
        from .save import push_to_hub

        summary["hub_url"] = push_to_hub(out, cfg.push_to_hub, private=cfg.hub_private)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _report(summary, before)
    return summary


def projection_types(model, spec) -> list[str]:
    """The projection names present in the decoder layers; a dms_llama checkpoint may lack some of them
    in some layers (peft then wraps what exists) or everywhere (they are left out)."""
    from torch import nn

    wanted = (spec.q, spec.k, spec.v, spec.o, spec.gate, spec.up, spec.down)
    prefix = f"{spec.decoder}.{spec.layers}."
    found = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefix)}
    return [w for w in wanted if w in found]


def reusable_results(pruned_dir: str, cfg: FinetuneConfig, model) -> dict | None:
    """The pruned checkpoint's own results.json as the 'before' row, when it measured exactly what this
    run will measure (same datasets, protocol, windows, tasks, limit, dtype): saves one evaluation."""
    from .evaluation import PPL_DATASETS, check_ppl_datasets, check_tasks

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
        and all(set(v) == {cfg.eval_protocol} for v in results.get("ppl", {}).values())
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


def _evaluate(model, tokenizer, cfg: FinetuneConfig, name: str) -> dict:
    from .evaluation import evaluate_model

    return evaluate_model(
        model, tokenizer, ppl=[d for d in cfg.eval_ppl.split(",") if d], protocols=[cfg.eval_protocol],
        tasks=[t for t in cfg.eval_tasks.split(",") if t], data_dir=cfg.data_dir, limit=cfg.eval_limit,
        max_windows=cfg.eval_max_windows, seed=cfg.seed, model_name=name,
    )


def _before_eval(path: str, model, tokenizer, cfg: FinetuneConfig, accelerator) -> dict:
    """The pruned model's evaluation before training, once per output folder: a resumed run reuses it."""
    if not os.path.exists(path):
        if accelerator.is_main_process:
            result = _evaluate(model, tokenizer, cfg, name=os.path.abspath(cfg.model))
            with open(path + ".tmp", "w") as f:
                json.dump(result, f, default=str)
            os.replace(path + ".tmp", path)
        accelerator.wait_for_everyone()
    with open(path) as f:
        return json.load(f)


def _describe_data(describe_dataset, cfg: FinetuneConfig) -> dict:
    try:
        info = describe_dataset(cfg.dataset, data_dir=cfg.data_dir, text_field=cfg.text_field)
    except (OSError, ValueError) as e:  # provenance is a courtesy; the data itself loaded fine
        return {"dataset": cfg.dataset, "error": str(e)}
    info.pop("files", None)
    return info | {"seq_len": cfg.seq_len, "num_samples": cfg.num_samples}


def _mean(values):
    return sum(values) / len(values) if values else None


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        ("learning rate", f"{summary['lr']:g}, AdamW, {summary['warmup_steps']} warmup steps then constant, gradient clipping at {summary['max_grad_norm']}"),
        (f"loss (mean of the first -> last {summary['loss_window']} steps)", f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}"),
        ("time", f"{summary['train_time_s']:.0f} s on {summary['num_processes']} process(es), {summary['dtype']}"),
    ]
    if summary.get("lora"):
        lora = summary["lora"]
        rows.insert(1, ("LoRA", f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on {', '.join(lora['targets'])}"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows])
    return ("## Fine-tuning\n\nAfter pruning, the weights were fine-tuned to recover quality (`dms_llm/finetune.py`); "
            "the architecture is unchanged.\n\n" + table)


def _how_it_was_made(pruned_dir: str) -> str:
    """The pruning command from the pruned checkpoint's card, then this one: the card tells both steps."""
    import re
    import shlex

    this = "dms_llm/finetune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        with open(os.path.join(pruned_dir, "README.md")) as f:
            m = re.search(r"^## How it was made\s*```bash\n(.*?)\n```", f.read(), re.S | re.M)
    except OSError:
        m = None
    return f"{m.group(1).strip()}\n# then\n{this}" if m else this


def _write_summary(folder: str, summary: dict) -> None:
    tmp = os.path.join(folder, ".finetune_summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, os.path.join(folder, "finetune_summary.json"))


def _save(model, tokenizer, plan, cfg, out, pruned_dir, summary) -> None:
    """Save the checkpoint into `out` (the same format as the pruned one), keeping the run's files beside it."""
    from .save import save_into_run_folder

    plan.metadata["finetune"] = {k: summary[k] for k in ("method", "steps", "teacher", "distill_weight", "lr", "train_time_s")} | {
        "data": summary["data"].get("dataset"), "pruned_model": pruned_dir}
    search = plan.metadata.get("search") or {}
    card = {"description": card_section(summary),
            "settings": {k: v for k, v in search.items() if v not in (None, False, "")},
            "command": _how_it_was_made(pruned_dir),
            "tags": ["fine-tuned"] + (["lora"] if cfg.method == "lora" else []) + (["knowledge-distillation"] if summary["teacher"] else [])}
    save_into_run_folder(model, tokenizer, out, plan, card, pruned_dir,
                         carry=("metrics.jsonl", "finetune_config.json", "tensorboard", os.path.join(STATE_DIR, "lora_adapter")),
                         add=lambda folder: _write_summary(folder, summary))


def _evaluate_after(model, tokenizer, cfg, out, before) -> dict:
    from .evaluation import write_results
    from .save import update_model_card

    results = _evaluate(model, tokenizer, cfg, name=out)
    if before:
        results["baseline"] = before
    write_results(results, os.path.join(out, "results.json"))
    update_model_card(out, results)
    return results


def _progress_bar(accelerator, steps, start):
    if not accelerator.is_main_process:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc="finetune", dynamic_ncols=True)

    def update(m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", kd=f"{m['distill_loss']:.3f}", lr=f"{m['lr']:.1e}")
        if m["step"] >= steps:
            bar.close()

    return update


def _report(summary, before) -> None:
    from .evaluation import ppl_change_lines

    lines = [
        f"checkpoint: {summary['output_dir']}",
        f"fine-tuned: {summary['method']}, {summary['steps']} steps, {summary['train_time_s']:.0f} s; "
        f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}",
    ]
    if summary.get("results"):
        lines += ppl_change_lines(summary["results"], before)
        lines.append(f"results: {os.path.join(summary['output_dir'], 'results.json')}")
    print("\n".join(lines))


def main(argv=None) -> int:
    return run_main(run, parse_config, argv)


if __name__ == "__main__":
    if __package__ in (None, ""):
        from dms_llm.finetune import main as package_main  # relative imports need the package

        sys.exit(package_main())
    sys.exit(main())
