"""The run engine shared by the DMS search and recovery fine-tuning.

One `Engine` per run: an Accelerate `Accelerator` (data parallel; the process's Accelerate state is adopted,
never reset), mixed precision (autocast, and loss scaling for fp16), the data order (a
function of seed and step, never of history), gradient accumulation with an optional distillation
term, checkpoints through Accelerate's `save_state` / `load_state` (trainable weights, optimiser, every
RNG, the step), per-step metrics (`metrics.jsonl`, and TensorBoard through Accelerate's trackers when
the package is installed), a progress bar, and a first Ctrl-C that finishes the step and checkpoints.
With no run folder nothing is written, and a stop before the end cannot be resumed.

    engine = Engine(RunSettings(seed=0), run_dir="runs/x", state_name="search_state")
    module, optimizer = engine.prepare(module, optimizer)
    engine.run(train_step, steps=200, block_len=256, resume=True)   # train_step(step) -> metrics dict
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.nn.functional as F

from ..arch import ModelParts
from ..errors import ActionableError
from ..files import recover_folder, swap_in, write_text_atomic

METRICS_FILE = "metrics.jsonl"
TRACKER = "tensorboard"  # Accelerate writes the events under RUN_DIR/tensorboard


@dataclass
class RunSettings:
    """How a run is executed; none of these change what a search finds, except through the data order."""

    batch_size: int = 1  # blocks per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimiser step
    seed: int = 0  # data order and everything random
    mixed_precision: str = "no"  # no, bf16 or fp16 (autocast)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50  # steps between checkpoints (with a run folder)
    stop_after: int | None = None  # checkpoint and stop after this many steps
    # Shard the (frozen) model's weights across the processes with FSDP2 (`fully_shard`, one unit per
    # decoder layer) instead of replicating them; what trains (the kept ratios) stays replicated.
    fsdp: bool = False


class Stopped(Exception):
    """The run stopped before its last step (stop_after or Ctrl-C) after checkpointing; resume it."""

    def __init__(self, step: int, total: int):
        super().__init__(f"stopped at step {step}/{total}")
        self.step, self.total = step, total


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2 (Hinton et al.)."""
    t = temperature
    log_s = F.log_softmax(student[:, :-1].float() / t, dim=-1)
    log_t = F.log_softmax(teacher[:, :-1].float() / t, dim=-1)
    return F.kl_div(log_s.flatten(0, 1), log_t.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


# The other processes wait at a barrier while the main one alone evaluates (before and after a search),
# writes the pruned checkpoint and refits it; under NCCL's default timeout of 10 minutes a 7B run evaluating
# the seven zero-shot tasks would be aborted. A collective that really hangs is reported this much later.
BARRIER_TIMEOUT = timedelta(hours=6)


def process_state():
    """Accelerate's process state (rank, main process, barriers), its process group created with
    BARRIER_TIMEOUT. On a machine without CUDA it must be created as CPU state, or torchrun's processes each
    believe they are the only one."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def add_lora(model, r: int, alpha: float, dropout: float = 0.0):
    """`model` wrapped by peft with LoRA adapters on every attention and MLP projection (the family's
    names, from the arch registry); returns (peft model, target names). The base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    targets = ModelParts(model).projection_names()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=targets)
    return get_peft_model(model, config), targets


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute activations in backward (under whichever of the two switch names this transformers has;
    the other one warns)."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def has_checkpoint(state_dir: str) -> bool:
    recover_folder(state_dir)
    return os.path.isfile(os.path.join(state_dir, "custom_checkpoint_0.pkl"))


class _TrainableState:
    """What training changes in a module that Accelerate does not hold (FSDP): its trainable parameters
    and buffers, checkpointed through Accelerate's custom-object protocol."""

    def __init__(self, module, keys: set[str]):
        self.module, self.keys = module, keys

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items() if k in self.keys}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != self.keys:
            raise RuntimeError(f"{len(set(state) ^ self.keys)} tensors differ, e.g. {sorted(set(state) ^ self.keys)[0]}")
        self.module.load_state_dict(state, strict=False)


class _Progress:
    """The step counter, checkpointed with the run (Accelerate's custom-object protocol)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _logged_step(line: str) -> float:
    """The step of a metrics line; a blank or cut-off line (a process killed mid-write) sorts last."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class Engine:
    def __init__(self, settings: RunSettings, run_dir: str | None = None, state_name: str = "state",
                 verbose: bool = True):
        from accelerate import Accelerator

        self.s = settings
        self.run_dir = os.path.abspath(run_dir) if run_dir else None
        process_state()  # the process group, with its timeout, if nothing created it yet
        # Accelerate keeps one mixed-precision setting per process and refuses a second Accelerator with
        # another, so the run does not pass its own: it adopts the process's (the launcher's, else "no") and
        # autocasts itself when that is "no". An fp32 search and a bf16 fine-tuning can then follow each other
        # in one session without resetting the caller's Accelerate state.
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=TRACKER if self.run_dir else None,
                               project_dir=self.run_dir)
        self.mixed_precision = settings.mixed_precision
        self.scaler = _own_precision(self.acc, settings.mixed_precision)
        if settings.mixed_precision == "bf16" and self.acc.device.type == "cpu" and cpu_has_bf16() is False:
            warnings.warn("mixed precision bf16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 in "
                          "/proc/cpuinfo): autocast emulates it, several times slower than fp32 (8x on an AVX2 EPYC, "
                          "docs/RESULTS.md 16); pass --mixed-precision no", stacklevel=2)
        self.state_dir = os.path.join(self.run_dir, state_name) if self.run_dir else None
        self.metrics_path = os.path.join(self.run_dir, METRICS_FILE) if self.run_dir else None
        if self.run_dir and self.acc.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
        self.progress = _Progress()
        self.acc.register_for_checkpointing(self.progress)
        if self.scaler is not None and self.scaler.is_enabled():
            self.acc.register_for_checkpointing(self.scaler)
        self.acc.register_save_state_pre_hook(self._keep_trainable_only)
        self.verbose = verbose
        self.module = None

    @property
    def step(self) -> int:
        return self.progress.step

    def say(self, *args) -> None:
        if self.verbose:
            self.acc.print(*args)

    def prepare(self, module, optimizer):
        if self.s.fsdp:
            # The sharded weights are frozen; the trainable rest is replicated and averaged by
            # `average_gradients` (a DDP wrapper cannot hold sharded parameters). The checkpoint holds
            # that trainable rest, as with DDP.
            self.module, optimizer = module, self.acc.prepare(optimizer)
            self.acc.register_for_checkpointing(_TrainableState(module, self._trainable_keys(module)))
        else:
            self.module, optimizer = self.acc.prepare(module, optimizer)
        return self.module, optimizer

    # ----- precision ------------------------------------------------------------------------------
    def autocast(self):
        """Autocast to the run's mixed precision (Accelerate's when the process is set to it)."""
        if self.scaler is None:
            return self.acc.autocast()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.acc.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss if self.scaler is None else self.scaler.scale(loss))

    def grad_scale(self) -> float:
        """The factor the gradients carry (fp16 loss scaling; else 1)."""
        scaler = self.scaler if self.scaler is not None else getattr(self.acc, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def clip_grad_norm_(self, params, max_norm: float, optimizer) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return self.acc.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def average_gradients(self, params) -> None:
        """Mean of the gradients over the processes, where no DDP wrapper does it (FSDP)."""
        if not self.s.fsdp or self.acc.num_processes == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.acc.num_processes)

    # ----- data and gradients ---------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int, num_blocks: int) -> list[int]:
        """The calibration blocks of one micro-batch: a function of (seed, step), never of history."""
        s, world, rank = self.s, self.acc.num_processes, self.acc.process_index
        per_step = s.batch_size * s.grad_accum * world
        epoch, offset = divmod(step * per_step, num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(s.seed * 1000003 + epoch))
        start = offset + (micro * world + rank) * s.batch_size
        return [int(order[(start + j) % num_blocks]) for j in range(s.batch_size)]

    def micro_batches(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """The current step's `grad_accum` micro-batches of this process, drawn from the calibration blocks."""
        return [blocks[self.batch_indices(self.step, micro, len(blocks))] for micro in range(self.s.grad_accum)]

    def accumulate(self, forward: Callable, batches: list[torch.Tensor], teacher: Callable | None = None,
                   distill_weight: float = 1.0, distill_temperature: float = 1.0,
                   last_micro_loss: Callable | None = None, task_weight: float = 1.0) -> dict:
        """Forward and backward of one optimiser step over the micro-batches `batches` (token tensors).

        Loss per micro-batch: `task_weight` x next-token loss of `forward(ids)` (reported unweighted), plus
        distill_weight x KL to `teacher(ids)` when a teacher is given, divided by their number;
        `last_micro_loss()` is added once, on the last micro-batch (the search's budget term). Returns the
        step's mean task and distillation losses.
        """
        acc, n = self.acc, len(batches)
        totals = {"task_loss": 0.0, "distill_loss": 0.0}
        self.module.train()
        for micro, batch in enumerate(batches):
            ids = batch.to(acc.device)
            last = micro == n - 1
            sync = acc.no_sync(self.module) if not last and acc.num_processes > 1 else nullcontext()
            with sync, self.autocast():
                logits = forward(ids)
                task = next_token_loss(logits, ids)
                loss = task_weight * task  # x 1.0 (the default) is exact: the loss and its gradient are unchanged
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(ids)
                    kd = distillation_loss(logits, teacher_logits, distill_temperature)
                    loss = loss + distill_weight * kd
                    totals["distill_loss"] += float(kd.detach()) / n
                loss = loss / n
                if last and last_micro_loss is not None:
                    loss = loss + last_micro_loss()
                self.backward(loss)
            totals["task_loss"] += float(task.detach()) / n
        return totals

    def mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.acc.num_processes == 1 else self.acc.reduce(tensor, reduction="mean")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on any: ranks must stop at the same step."""
        if self.acc.num_processes == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), reduction="sum").item() > 0)

    # ----- checkpoints ----------------------------------------------------------------------------
    def _trainable_keys(self, model) -> set[str]:
        """The state-dict keys of trainable parameters and (persistent) buffers: what training changes."""
        changing = {name for name, p in model.named_parameters() if p.requires_grad}
        changing |= {name for name, _ in model.named_buffers()}
        return changing & set(model.state_dict())

    def _keep_trainable_only(self, models, weights, output_dir) -> None:
        """Frozen weights come from the source model; the checkpoint holds what training changes."""
        for i, model in enumerate(models):
            keep = self._trainable_keys(model)
            weights[i] = OrderedDict((k, v) for k, v in weights[i].items() if k in keep)

    def save_checkpoint(self) -> None:
        """Into a staging folder, then swapped in: an interruption never leaves half a checkpoint."""
        staging = self.state_dir + ".saving"
        if self.acc.is_main_process and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.acc.wait_for_everyone()
        self.acc.save_state(staging)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            swap_in(staging, self.state_dir)
        self.acc.wait_for_everyone()

    def load_checkpoint(self) -> bool:
        if not self.state_dir or not has_checkpoint(self.state_dir):
            return False
        from safetensors import safe_open

        weights = os.path.join(self.state_dir, "model.safetensors")
        if os.path.isfile(weights) == self.s.fsdp:
            raise ActionableError(f"the checkpoint in {self.state_dir} was made {'without' if self.s.fsdp else 'with'} "
                               f"--fsdp; resume it the way it was made")
        try:
            if not self.s.fsdp:
                with safe_open(weights, "pt") as f:
                    saved = set(f.keys())
                expected = self._trainable_keys(self.module)
                if saved != expected:
                    raise RuntimeError(f"{len(saved ^ expected)} tensors differ, e.g. {sorted(saved ^ expected)[0]}")
            self.acc.load_state(self.state_dir, strict=False)
        except RuntimeError as e:
            raise ActionableError(f"the checkpoint in {self.state_dir} does not fit this run ({str(e).splitlines()[0][:200]}): "
                               "it was made for another model or with other settings; resume with those of its run") from None
        if self.acc.is_main_process and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:  # a resumed log reads like an uninterrupted one
                lines = [line for line in f if _logged_step(line) <= self.step]
            write_text_atomic(self.metrics_path, "".join(lines))
        return True

    # ----- the loop -------------------------------------------------------------------------------
    def run(self, train_step: Callable[[int], dict], steps: int, block_len: int, resume: bool = False,
            desc: str = "run", postfix: Callable[[dict], dict] | None = None) -> None:
        """Call `train_step(step)` (it returns the step's metrics) until `steps` are done, writing one
        metrics line per step and checkpointing every `checkpoint_every` steps, at `stop_after` and on
        Ctrl-C (then `Stopped` is raised; a second Ctrl-C aborts)."""
        if resume and self.load_checkpoint():
            self.say(f"resumed at step {self.step}/{steps}")
        acc, s = self.acc, self.s
        stop_at = steps if s.stop_after is None else min(steps, s.stop_after)
        if stop_at < steps and not self.run_dir:
            raise ValueError("stop_after needs a run folder to checkpoint into")
        tokens_per_step = s.batch_size * s.grad_accum * acc.num_processes * block_len
        main = acc.is_main_process and self.run_dir is not None
        writer = open(self.metrics_path, "a") if main else None
        if main:
            acc.init_trackers(TRACKER)
        bar = self._progress_bar(steps, desc, postfix)
        try:
            with _graceful_interrupt() as interrupted:
                while self.step < stop_at and not self.any_rank(bool(interrupted)):
                    start = time.perf_counter()
                    metrics = {"step": self.step + 1, **train_step(self.step)}
                    self.progress.step += 1
                    metrics["tokens_per_s"] = tokens_per_step / (time.perf_counter() - start)
                    if writer:
                        writer.write(json.dumps(metrics) + "\n")
                        writer.flush()
                        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                                step=metrics["step"])
                    if bar is not None:
                        bar(metrics)
                    due = self.step % s.checkpoint_every == 0 or self.step == stop_at
                    if self.run_dir and (due or self.any_rank(bool(interrupted))):
                        self.save_checkpoint()
        finally:
            if writer:
                writer.close()
            for tracker in acc.trackers:  # not end_training(): it would end the process group too
                tracker.finish()
        if self.step < steps:
            raise Stopped(self.step, steps)

    def _progress_bar(self, steps: int, desc: str, postfix):
        if not (self.verbose and self.acc.is_main_process):
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=self.step, desc=desc, dynamic_ncols=True)

        def update(m):
            bar.update(1)
            if postfix:
                bar.set_postfix(**postfix(m))
            if m["step"] >= steps:
                bar.close()

        return update


def cpu_has_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (Linux: avx512_bf16 or amx_bf16 among its flags); None where
    that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def _own_precision(acc, wanted: str):
    """None when Accelerate runs the process at `wanted` precision; else the run's own loss scaler
    (enabled for fp16 only), with which it autocasts itself."""
    have = acc.mixed_precision
    if have == wanted:
        return None
    if have != "no":
        raise ValueError(f"this process runs Accelerate with mixed precision {have!r} (accelerate launch "
                         f"--mixed_precision, ACCELERATE_MIXED_PRECISION or an earlier Accelerator), so a run with "
                         f"mixed_precision={wanted!r} cannot start in it: ask for {have!r}, or launch it with {wanted!r}")
    return torch.amp.GradScaler(acc.device.type, enabled=wanted == "fp16")


@contextmanager
def _graceful_interrupt():
    """Yields a list that becomes non-empty on the first Ctrl-C, so a loop can finish its step and
    checkpoint; a second Ctrl-C raises KeyboardInterrupt as usual."""
    interrupted: list[bool] = []

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        yield interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
