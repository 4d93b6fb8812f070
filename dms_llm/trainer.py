"""The DMS search loop (DMS sections 1 and 3): schedule, budget loss, importance, refine, resume.

`SearchLoop` is given a hooked model, its masks and the calibration blocks; `run()` performs the
remaining steps and returns when done (or raises `KeyboardInterrupt` after checkpointing). Everything
that decides the result (data order, masks, optimiser, RNG) is saved in one checkpoint, so a resumed
run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .budget import ParameterCounter, budget_loss, fit_to_budget  # noqa: F401 (search.py reads it here)
from .masks import ModelMasks

STATE_FILE = "state.pt"


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    grad_accum: int
    ratio_lr: float
    weight_lr: float
    budget_weight: float
    target_params: int
    schedule_fraction: float = 0.8
    distill: bool = False
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    stop_after: int | None = None


class SearchModule(nn.Module):
    """Model + masks as one module, so Accelerate/DDP synchronises ratio and weight gradients alike."""

    def __init__(self, model: nn.Module, masks: ModelMasks):
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2 (Hinton et al.)."""
    t = temperature
    log_s = F.log_softmax(student[:, :-1].float() / t, dim=-1)
    log_t = F.log_softmax(teacher[:, :-1].float() / t, dim=-1)
    return F.kl_div(log_s.flatten(0, 1), log_t.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


def write_state(state: dict, path: str) -> None:
    """torch.save via a temporary file and a rename: a crash mid-write never corrupts the last checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past `step`, so a resumed log reads like an uninterrupted one."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


@contextmanager
def graceful_interrupt():
    """Yields a list that becomes non-empty on the first Ctrl-C, so a loop can finish its step and
    checkpoint; a second Ctrl-C raises KeyboardInterrupt as usual."""
    interrupted: list[bool] = []

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)

    previous = signal.signal(signal.SIGINT, on_sigint) if _in_main_thread() else None
    try:
        yield interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def scheduled_target_ratio(step: int, steps: int, final_ratio: float, fraction: float) -> float:
    """t(p) = final ** p with p from 0 to 1 over the first `fraction` of the steps, then constant."""
    p = min(1.0, step / max(1.0, fraction * steps))
    return final_ratio**p


def batch_indices(step: int, micro: int, settings: LoopSettings, num_blocks: int, rank: int, world: int) -> list[int]:
    """The calibration blocks of one micro-batch: a function of (seed, step), never of history."""
    per_step = settings.batch_size * settings.grad_accum * world
    epoch, offset = divmod(step * per_step, num_blocks)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(settings.seed * 1000003 + epoch))
    start = offset + (micro * world + rank) * settings.batch_size
    return [int(order[(start + j) % num_blocks]) for j in range(settings.batch_size)]


def accumulate_gradients(acc, module, forward, teacher, blocks: torch.Tensor, step: int, order, distill_weight: float,
                         distill_temperature: float, last_micro_loss=None) -> dict:
    """Forward and backward of one optimiser step over `order.grad_accum` micro-batches (data order of
    `batch_indices`; `order` carries batch_size, grad_accum and seed), shared by the search and fine-tuning.

    Loss per micro-batch: next-token loss of `forward(ids)`, plus distill_weight x KL to `teacher(ids)`
    when a teacher is given, divided by grad_accum; `last_micro_loss()` is added once, on the last
    micro-batch (the search's budget term). Returns the step's mean task and distillation losses.
    """
    n = order.grad_accum
    totals = {"task_loss": 0.0, "distill_loss": 0.0}
    module.train()
    for micro in range(n):
        idx = batch_indices(step, micro, order, len(blocks), acc.process_index, acc.num_processes)
        ids = blocks[idx].to(acc.device)
        last = micro == n - 1
        sync = acc.no_sync(module) if not last and acc.num_processes > 1 else nullcontext()
        with sync, acc.autocast():
            logits = forward(ids)
            task = next_token_loss(logits, ids)
            loss = task
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(ids)
                kd = distillation_loss(logits, teacher_logits, distill_temperature)
                loss = loss + distill_weight * kd
                totals["distill_loss"] += float(kd.detach()) / n
            loss = loss / n
            if last and last_micro_loss is not None:
                loss = loss + last_micro_loss()
            acc.backward(loss)
        totals["task_loss"] += float(task.detach()) / n
    return totals


class SearchLoop:
    def __init__(self, accelerator, module: SearchModule, masks: ModelMasks, counter: ParameterCounter,
                 blocks: torch.Tensor, settings: LoopSettings, state_dir: str, metrics_path: str,
                 teacher=None, weight_params=()):
        self.acc = accelerator
        self.masks = masks
        self.counter = counter
        self.blocks = blocks
        self.s = settings
        self.state_dir = state_dir
        self.metrics_path = metrics_path
        self.teacher = teacher  # callable(input_ids) -> logits of the unpruned model, or None
        self.dense = counter.dense()
        self.final_ratio = settings.target_params / self.dense
        self.refine_start = int(math.ceil(settings.schedule_fraction * settings.steps))
        groups = [{"params": masks.ratio_parameters(), "lr": settings.ratio_lr, "weight_decay": 0.0}]
        self.weight_params = [p for p in weight_params if p.requires_grad]
        if self.weight_params:
            groups.append({"params": self.weight_params, "lr": settings.weight_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        self.module, self.optimizer = accelerator.prepare(module, optimizer)
        self.step = 0

    # ----- checkpoints -------------------------------------------------------------------------
    def state_path(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    def save_state(self) -> None:
        if not self.acc.is_main_process:
            return
        state = {
            "step": self.step,
            "masks": self.masks.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weights": {str(i): p.detach().cpu() for i, p in enumerate(self.weight_params)},
            "rng": rng_state(),
        }
        write_state(state, self.state_path())

    def load_state(self) -> bool:
        if not os.path.exists(self.state_path()):
            return False
        state = torch.load(self.state_path(), map_location="cpu", weights_only=False)
        try:
            self.masks.load_state_dict(state["masks"])
        except RuntimeError:  # search.check_output_dir compares the settings; this catches another model too
            raise RuntimeError(f"the checkpoint in {self.state_dir} does not fit these masks: it was made for another "
                               f"model or with other search settings; resume with those of its run") from None
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for i, p in enumerate(self.weight_params):
                p.copy_(state["weights"][str(i)].to(p.device))
        set_rng_state(state["rng"])
        self.step = state["step"]
        if self.step >= self.refine_start:
            self.masks.freeze_discrete()
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the checkpoint, so a resumed log reads like an uninterrupted one."""
        if self.acc.is_main_process:
            truncate_metrics(self.metrics_path, self.step)

    # ----- one step ----------------------------------------------------------------------------
    def _all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.acc.num_processes == 1:
            return tensor
        return self.acc.reduce(tensor, reduction="mean")

    def train_step(self) -> dict:
        s, acc = self.s, self.acc
        target_ratio = scheduled_target_ratio(self.step, s.steps, self.final_ratio, s.schedule_fraction)
        if self.step == self.refine_start:
            self.masks.freeze_discrete()
        budget = {}

        def budget_term() -> torch.Tensor:  # once per step: the masks are shared by every micro-batch
            ratio_now = self.counter.masked(self.masks) / self.dense
            budget["loss"] = budget_loss(ratio_now, target_ratio, s.budget_weight)
            return budget["loss"].float()

        teacher = self.teacher if s.distill else None
        totals = accumulate_gradients(acc, self.module, self.module, teacher, self.blocks, self.step, s, s.distill_weight,
                                      s.distill_temperature, last_micro_loss=budget_term)
        bl = budget["loss"]
        scaler = getattr(acc, "scaler", None)
        grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.masks.update_importance(grad_scale=grad_scale, all_reduce=self._all_reduce_mean)
        for _, topk in self.masks.named_structures():
            if topk.frozen:
                topk.ratio.grad = None  # refine: heads and depth stay where they are
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masks.clamp_()
        self.step += 1
        params = self.counter.hard(self.masks)
        return {
            "step": self.step,
            "loss": totals["task_loss"] + s.distill_weight * totals["distill_loss"] + float(bl.detach()),
            **totals,
            "budget_loss": float(bl.detach()),
            "params": params,
            "params_ratio": params / self.dense,
            "target_ratio_now": target_ratio,
            "target_params": s.target_params,
            "phase": "refine" if self.step > self.refine_start else "search",
        }

    # ----- the loop ----------------------------------------------------------------------------
    def run(self, progress=None) -> bool:
        """Run to the end (True) or until interrupted / `stop_after` (False), checkpointing either way."""
        s = self.s
        return run_steps(self, s.steps, s.stop_after, s.checkpoint_every, s.batch_size * s.grad_accum,
                         self.metrics_path, progress)


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when it is True on any: ranks must stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0)


def run_steps(loop, steps: int, stop_after: int | None, checkpoint_every: int, blocks_per_step: int,
              metrics_path: str, progress=None) -> bool:
    """Drive `loop` (with `acc`, `step`, `blocks`, `train_step()`, `save_state()`) to `steps`.

    Writes one metrics line per step (and TensorBoard scalars when installed), checkpoints every
    `checkpoint_every` steps, at `stop_after` and on Ctrl-C; the first Ctrl-C finishes the current step,
    a second one aborts. Returns True when all steps are done.
    """
    acc = loop.acc
    writer = open(metrics_path, "a") if acc.is_main_process else None
    board = tensorboard_writer(os.path.join(os.path.dirname(metrics_path), "tensorboard")) if writer else None
    tokens_per_step = blocks_per_step * acc.num_processes * loop.blocks.shape[1]
    stop_at = steps if stop_after is None else min(steps, stop_after)
    try:
        with graceful_interrupt() as interrupted:
            while loop.step < stop_at and not any_rank(acc, bool(interrupted)):
                start = time.perf_counter()
                metrics = loop.train_step()
                metrics["tokens_per_s"] = tokens_per_step / (time.perf_counter() - start)
                if writer:
                    writer.write(json.dumps(metrics) + "\n")
                    writer.flush()
                if board is not None:
                    for key, value in metrics.items():
                        if isinstance(value, (int, float)) and key != "step":
                            board.add_scalar(key, value, metrics["step"])
                if progress is not None:
                    progress(metrics)
                if loop.step % checkpoint_every == 0 or loop.step == stop_at or any_rank(acc, bool(interrupted)):
                    acc.wait_for_everyone()
                    loop.save_state()
    finally:
        if writer:
            writer.close()
        if board is not None:
            board.close()
    return loop.step >= steps


def tensorboard_writer(log_dir: str):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
