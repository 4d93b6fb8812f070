"""Recovery fine-tuning of a pruned model as a library call: LoRA (merged at the end) or all weights,
with an optional distillation term from the dense model.

    from dms_llm.training.recovery import RecoveryConfig, recover
    result = recover(pruned, blocks, RecoveryConfig(steps=250, lr=5e-4), teacher=dense)
    result.model        # the fine-tuned model, LoRA merged: the same architecture as `pruned`

AdamW, a linear warmup over `warmup_steps` then a constant learning rate (`schedule="cosine"`: a cosine
decay to `min_lr_ratio` x `lr` at the last step), gradient clipping at `max_grad_norm`. Loss per token:
`ce_weight` x cross-entropy on the next token + `distill_weight` x KL(teacher || student) at
`distill_temperature` (scaled by T^2); `ce_weight=0` distils only. Nothing is written unless `run_dir`
is given: then metrics.jsonl, tensorboard/, a resumable checkpoint (finetune_state/) and the unmerged
lora_adapter/.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .engine import Engine, RunSettings, add_lora, set_activation_checkpointing

METHODS = ("lora", "full")
SCHEDULES = ("constant", "cosine")


@dataclass
class RecoveryConfig:
    steps: int
    method: str = "lora"  # lora (adapters on every projection present, merged at the end) or full
    lr: float = 2e-4
    warmup_steps: int = 0  # linear warmup, then the schedule
    schedule: str = "constant"  # after the warmup: constant, or cosine down to min_lr_ratio x lr at the last step
    min_lr_ratio: float = 0.1  # cosine only
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    ce_weight: float = 1.0  # weight of the next-token cross-entropy; 0: distillation only (needs a teacher)
    distill_weight: float = 1.0  # ignored without a teacher
    distill_temperature: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be lora or full, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")


@dataclass
class RecoveryResult:
    model: object  # the fine-tuned model (LoRA merged), in eval mode without gradients
    trainable_params: int
    lora_targets: list[str] | None
    train_time_s: float
    merge_max_abs_diff: float | None  # merged vs unmerged LoRA logits on one block


def lr_at(config: RecoveryConfig, step: int) -> float:
    # A function of the step (set each step, not a prepared scheduler, which Accelerate advances once per
    # process): resuming is trivially exact. transformers' constant-with-warmup schedule starts at 0 instead.
    if step < config.warmup_steps or config.schedule == "constant":
        return config.lr * min(1.0, (step + 1) / (config.warmup_steps + 1))
    # cosine from the peak at the end of the warmup (step == warmup_steps) to the floor at the last step
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def recover(model, blocks: torch.Tensor, config: RecoveryConfig, run: RunSettings | None = None, teacher=None,
            run_dir: str | None = None, resume: bool = False, verbose: bool = True) -> RecoveryResult:
    """Fine-tune `model` (in place) on `blocks`; raises `engine.Stopped` when stopped early."""
    from accelerate.utils import set_seed

    run = run or RunSettings()
    if config.ce_weight == 0 and (teacher is None or config.distill_weight == 0):
        raise ValueError("ce_weight 0 leaves no loss: distillation only needs a teacher and distill_weight > 0")
    engine = Engine(run, run_dir, "finetune_state", verbose)
    set_seed(run.seed)
    model.requires_grad_(False)
    peft_model, trained, targets = None, model, None
    if config.method == "lora":
        peft_model, targets = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout)
        trained = peft_model
    else:
        model.requires_grad_(True)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    if run.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    n_trainable = sum(p.numel() for p in trainable)
    engine.say(f"{config.method}: {n_trainable:,} trainable parameters" + (f" on {', '.join(targets)}" if targets else "")
               + f"; {config.steps} steps of {run.batch_size * run.grad_accum * engine.acc.num_processes} x "
               f"{blocks.shape[1]} tokens")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    module, optimizer = engine.prepare(trained, optimizer)
    logits_of = lambda m: lambda ids: m(input_ids=ids, use_cache=False).logits  # noqa: E731
    distill = logits_of(teacher) if teacher is not None else None
    per_step = run.batch_size * run.grad_accum * engine.acc.num_processes

    def train_step(step: int) -> dict:
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = engine.accumulate(logits_of(module), engine.micro_batches(blocks), distill, config.distill_weight,
                                   config.distill_temperature, task_weight=config.ce_weight)
        grad_norm = engine.clip_grad_norm_(trainable, config.max_grad_norm, optimizer)
        engine.optimizer_step(optimizer)
        loss = config.ce_weight * totals["task_loss"] + (config.distill_weight * totals["distill_loss"] if distill else 0.0)
        return {"loss": loss, **totals, "lr": lr, "grad_norm": float(grad_norm), "epoch": (step + 1) * per_step / len(blocks)}

    start = time.time()
    engine.run(train_step, config.steps, blocks.shape[1], resume, "finetune",
               postfix=lambda m: {"loss": f"{m['loss']:.3f}", "kd": f"{m['distill_loss']:.3f}", "lr": f"{m['lr']:.1e}"})
    train_time = time.time() - start

    # prepare() patched forward with autocast under mixed precision: unwrap, so that the parity probe,
    # the merge and the evaluation afterwards all run at the weights' own precision
    trained = engine.acc.unwrap_model(module, keep_fp32_wrapper=False)
    if peft_model is None:
        model = trained
    engine.acc.free_memory()  # the optimiser state is no longer needed
    probe = blocks[:1].to(engine.acc.device)
    trained.eval()
    parity = None
    if peft_model is not None:
        with torch.no_grad():
            trained_logits = trained(input_ids=probe, use_cache=False).logits.float()
        if run_dir and engine.acc.is_main_process:
            peft_model.save_pretrained(os.path.join(run_dir, "lora_adapter"))
        model = peft_model.merge_and_unload()
        with torch.no_grad():
            parity = float((model(input_ids=probe, use_cache=False).logits.float() - trained_logits).abs().max())
    if run.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval().requires_grad_(False)
    return RecoveryResult(model, n_trainable, targets, train_time, parity)
