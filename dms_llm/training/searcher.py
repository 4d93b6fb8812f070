"""The DMS search as a library: one handle owns the masks, hooks, optimiser, schedule and final fit.

    searcher = dms_llm.prepare(model, DMSConfig(target_ratio=0.8))   # masks attached to `model` by hooks
    for batch in batches:                                             # your loop: [batch, seq_len] token ids
        metrics = searcher.step(batch)                                # one optimiser step: loss, params, phase
    plan = searcher.plan()                                            # hooks off; the kept indices
    pruned = dms_llm.convert(model, plan)                             # a new, smaller model carrying its plan

or the whole loop on calibration blocks (`dms_llm.load_calibration`), with the seeded data order, warm-up,
metrics and resumable checkpoints of the command: `plan = dms_llm.search(model, blocks, config)`.

With frozen weights (the default) `model` ends as it was; with `train_weights` lora or full it is trained
in place (LoRA merged back by `plan()`), so `convert(model, plan)` prunes the trained weights. Nothing
global changes: no seed is set (LoRA starts from `RunSettings.seed` on a forked generator), Accelerate's
process state is adopted, never reset, and no second copy of the model is built unless asked
(`search(..., check=True)`). Nothing is written unless a run folder is given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager

import torch

from ..budget import ParameterCounter
from ..inject import MaskHooks
from ..masks import ModelMasks
from ..method import DMSConfig
from ..plan import PrunePlan
from ..prune import pruned_tensor_reader
from ..streamed import skeleton, streamed
from .dms import (
    SearchLoop,
    SearchModule,
    fit_architecture,
    masked_model_logits,
    plan_hash_per_rank,
    prepare_weights,
    resolve_budget,
    score,
    shard,
    warm_up_importance,
)
from .engine import Engine, RunSettings, has_checkpoint


@contextmanager
def _seeded(seed: int):
    """Torch's generators seeded with `seed` inside, and as they were outside."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _token_ids(batch) -> torch.Tensor:
    """[batch, seq_len] token ids from a tensor or a tokenizer's / collator's mapping (unpadded)."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise ValueError("the batch is padded (attention_mask has zeros): the search's loss counts every token, "
                             "so give full blocks of text, e.g. from dms_llm.load_calibration")
        if "input_ids" not in batch:
            raise ValueError(f"a batch mapping needs input_ids, got keys {sorted(batch)}")
        batch = batch["input_ids"]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype not in (torch.long, torch.int):
        got = f"a {batch.dim()}-d {batch.dtype} tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"a batch is a [batch, seq_len] integer tensor of token ids, got {got}")
    if batch.shape[1] < 2:
        raise ValueError(f"a batch needs at least 2 tokens per row (the loss predicts the next one), got {batch.shape[1]}")
    return batch.long()


class Searcher:
    """A DMS search on `model`, from `prepare` to `plan`. Masks are attached by hooks from the start; `plan()`
    (or `close()`, or leaving a `with` block) takes them off. `step(batch)` runs the search in your own loop;
    `run(blocks)` runs `config.steps` steps on micro-batches drawn from calibration blocks."""

    def __init__(self, model, config: DMSConfig, run: RunSettings | None = None, run_dir: str | None = None,
                 verbose: bool = False):
        if not isinstance(config, DMSConfig):
            raise TypeError(f"config must be a DMSConfig, got {type(config).__name__}")
        self.model, self.config, self.settings = model, config, run or RunSettings()
        self.target, self.dense = resolve_budget(model, config)
        self.engine = Engine(self.settings, run_dir, "search_state", verbose)
        self.engine.say(f"dense parameters {self.dense:,}; target {self.target:,} ({self.target / self.dense:.1%}); "
                        f"searching {','.join(config.structures)}")
        self.masks = ModelMasks.for_method(model.config, config)
        self.counter = ParameterCounter(model)
        self.search_time = 0.0
        self._plan: PrunePlan | None = None
        self._probe = self._probe_logits = None
        self._hooks = None
        with _seeded(self.settings.seed):  # LoRA's initial weights, without touching the caller's generators
            self._hooked, self._peft, weights, teacher = prepare_weights(config, self.settings, model, self.masks)
        try:
            if self.settings.fsdp:
                shard(model, config, self.engine)
            self._hooks = MaskHooks(self._hooked, self.masks).install()
            self.loop = SearchLoop(self.engine, SearchModule(self._hooked, self.masks), self.masks, self.counter, None,
                                   config, self.target, teacher, weights)
        except BaseException:
            self.close()
            raise

    # ----- searching --------------------------------------------------------------------------------
    @property
    def steps_done(self) -> int:
        return self.engine.step

    def step(self, batch) -> dict:
        """One optimiser step on `batch` ([batch, seq_len] token ids, or a mapping holding `input_ids`):
        schedule, budget term, importance update and kept ratios as in the search's own loop, whose step
        number this continues. Returns the step's metrics (`loss`, `task_loss`, `budget_loss`, `params`, ...)."""
        self._check_open()
        ids = _token_ids(batch)
        start = time.perf_counter()
        metrics = {"step": self.engine.step + 1, **self.loop.step(self.engine.step, [ids])}
        self.engine.progress.step += 1
        self.search_time += time.perf_counter() - start
        return metrics

    def run(self, blocks: torch.Tensor, resume: bool = False) -> None:
        """The remaining of `config.steps` steps on `blocks` ([num_samples, seq_len]; the order is a function of
        `RunSettings.seed` and the step), after the importance warm-up; with a run folder, metrics and
        checkpoints, and `resume` continues its checkpoint. Raises `Stopped` at `RunSettings.stop_after`."""
        self._check_open()
        blocks = _token_ids(blocks)
        c, engine = self.config, self.engine
        start = time.time()
        resuming = resume and engine.state_dir is not None and has_checkpoint(engine.state_dir)
        if c.warmup_blocks and not resuming and engine.step == 0:
            warm_up_importance(engine, self.loop.module, self.masks, blocks, c.warmup_blocks, self.settings.batch_size)
        engine.run(lambda step: self.loop.step(step, engine.micro_batches(blocks)), c.steps, blocks.shape[1], resume,
                   "DMS search", postfix=lambda m: {"loss": f"{m['task_loss']:.3f}", "phase": m["phase"],
                                                    "params": f"{m['params'] / 1e6:.2f}M/{self.target / 1e6:.2f}M"})
        self.search_time += time.time() - start

    # ----- the result -------------------------------------------------------------------------------
    def plan(self, source_model: str | None = None, probe: torch.Tensor | None = None) -> PrunePlan:
        """End the search: fit the kept ratios to the budget, read the hard masks as a `PrunePlan`, take the
        hooks off (and merge LoRA into the weights). Later calls return the same plan.

        `probe` (token ids): the binarised masked model's logits on it are kept, so that `verify(pruned)` can
        show that the pruned model computes the same function."""
        if self._plan is not None:
            return self._plan
        self._check_open()
        c = self.config
        fit = fit_architecture(self.engine, self.masks, self.counter, self.target, self.dense, c)
        plan = self.masks.to_plan(self.model.config, source_model=source_model)
        hashes = plan_hash_per_rank(plan, self.engine.acc)
        if probe is not None:
            self._probe = _token_ids(probe).to(self.engine.acc.device)
            self._probe_logits = masked_model_logits(self._hooked, self.masks, self._probe)
        self._merge_weights()
        self._hooks.remove()
        record = plan.metadata
        record.method, record.target_params, record.budget_fit = c.to_dict(), self.target, fit
        record.search_time_s, record.num_processes, record.plan_sha256_per_rank = (
            self.search_time, self.engine.acc.num_processes, hashes)
        self.engine.acc.free_memory()  # the optimiser state and the references Accelerate holds
        self._plan = plan
        return plan

    def verify(self, pruned, heldout: torch.Tensor | None = None) -> float:
        """The max abs difference between `pruned`'s logits and the binarised masked model's on the `probe`
        given to `plan`, recorded in the plan (`masked_vs_pruned_max_abs_logit_diff`) with, when `heldout`
        blocks are given, the pruned model's next-token loss on them (`heldout_loss`)."""
        if self._probe_logits is None:
            raise RuntimeError("verify needs the masked model's logits: call plan(probe=token_ids) first")
        score(pruned, self._plan, self._probe, self._probe_logits, heldout, self.settings.batch_size, say=self.engine.say)
        return self._plan.metadata.masked_vs_pruned_max_abs_logit_diff

    @property
    def probe(self) -> dict | None:
        """The probe given to `plan` and the masked model's logits on it, for a pruned model built elsewhere."""
        return None if self._probe is None else {"probe": self._probe, "logits": self._probe_logits}

    # ----- the model as it was -------------------------------------------------------------------------
    def close(self) -> None:
        """Take the hooks off; a search that did not reach `plan()` also takes its LoRA adapters off the model."""
        if self._hooks is not None:
            self._hooks.remove()
        if self._plan is None and self._peft is not None:
            self._peft.unload()
            self._peft = None

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _merge_weights(self) -> None:
        if self._peft is not None and self._peft.merge_and_unload() is not self.model:
            raise RuntimeError("peft merged LoRA into a new model object; the caller's model would not hold the weights")
        self._peft = None

    def _check_open(self) -> None:
        if self._plan is not None:
            raise RuntimeError("this search has ended (plan() was called); prepare a new one")
        if self._hooks is None or not self._hooks.installed:
            raise RuntimeError("this search was closed; prepare a new one")


def prepare(model, config: DMSConfig | None = None, run: RunSettings | None = None, run_dir: str | None = None,
            verbose: bool = False) -> Searcher:
    """Attach DMS masks to `model` (in place, by hooks) and return the `Searcher` that trains them.
    `config` holds the method and the budget (default: the recommended recipe, which needs a budget:
    `DMSConfig(target_ratio=0.8)`); `run` how it runs (batch size, data order, precision); `run_dir` where
    metrics and checkpoints go (nothing is written without it)."""
    return Searcher(model, config if config is not None else DMSConfig(), run, run_dir, verbose)


def search(model, blocks: torch.Tensor, config: DMSConfig | None = None, *, run: RunSettings | None = None,
           run_dir: str | None = None, resume: bool = False, check: bool = False,
           heldout: torch.Tensor | None = None, source_model: str | None = None, verbose: bool = True) -> PrunePlan:
    """The whole search on calibration blocks ([num_samples, seq_len] token ids, `dms_llm.load_calibration`):
    `prepare`, `config.steps` steps, `plan`. Raises `Stopped` when `run.stop_after` or Ctrl-C ends it early
    (after checkpointing into `run_dir`; `resume=True` continues it).

    `check` runs the pruned model layer by layer (sliced from `model` as each layer runs: one pruned layer of
    memory, `streamed`) to record in the plan that it
    matches the binarised masked model on the first block (`masked_vs_pruned_max_abs_logit_diff`); `heldout`
    blocks, never searched on, are scored on it too (`heldout_loss`)."""
    blocks = _token_ids(blocks)
    with prepare(model, config, run, run_dir, verbose) as searcher:
        searcher.run(blocks, resume=resume)
        plan = searcher.plan(source_model=source_model, probe=blocks[:1] if check or heldout is not None else None)
    if searcher.probe is not None:
        _verify_streamed(searcher, model, plan, heldout)
    return plan


def search_plan(model, blocks: torch.Tensor, target_params: float | None = None, target_ratio: float | None = None,
                config: DMSConfig | None = None, run: RunSettings | None = None, run_dir: str | None = None,
                resume: bool = False, heldout: torch.Tensor | None = None, source_model: str | None = None,
                verbose: bool = True, check: bool = False, probe_out: dict | None = None) -> PrunePlan:
    """`search` with the budget beside the config (as the command gives it) instead of in it; the plan records
    the config as given (`metadata.method`) and the budget in parameters (`metadata.target_params`).
    `probe_out`, a dict, receives the first block and the masked model's logits on it (`probe`, `logits`), for
    a pruned model the caller builds (`dms_llm.training.dms.score`)."""
    given = config if config is not None else DMSConfig()
    if target_params is not None or target_ratio is not None:
        config = DMSConfig.from_dict({**given.to_dict(), "target_params": target_params, "target_ratio": target_ratio})
    if run is not None and run.fsdp and check:
        raise ValueError("with fsdp the model stays sharded: prune from the checkpoint files (check=False)")
    with prepare(model, config if config is not None else given, run, run_dir, verbose) as searcher:
        searcher.run(_token_ids(blocks), resume=resume)
        wants_probe = check or heldout is not None or probe_out is not None
        plan = searcher.plan(source_model=source_model, probe=blocks[:1] if wants_probe else None)
    plan.metadata.method = given.to_dict()
    if probe_out is not None:
        probe_out.update(searcher.probe)
    if check or heldout is not None:
        _verify_streamed(searcher, model, plan, heldout)
    return plan


def _verify_streamed(searcher: Searcher, model, plan: PrunePlan, heldout) -> None:
    """`searcher.verify` on the pruned model without building it whole: each decoder layer is sliced from
    `model` when it runs and dropped after (`streamed`), so the check costs one pruned layer of memory."""
    first = next(model.parameters())
    pruned = skeleton(plan.pruned_config(), first.dtype, getattr(model.config, "_attn_implementation", None))
    with streamed(pruned, pruned_tensor_reader(model, plan), first.device):
        searcher.verify(pruned, heldout)
