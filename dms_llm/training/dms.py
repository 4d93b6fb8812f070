"""The pieces of the DMS search that `Searcher` (training/searcher.py) puts together: the masked model as one
module, the search step (schedule, budget term, Taylor importance, refine; DMS sections 1 and 3), the
model's weights during the search (frozen, LoRA or full), the importance warm-up, FSDP sharding, the final
fit to the budget and the checks of a plan against the pruned model."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import torch
from torch import nn

from ..arch import arch_spec
from ..budget import ParameterCounter, budget_loss, fit_to_budget, resolve_target, smallest_reachable
from ..masks import ModelMasks
from ..method import DMSConfig
from ..passes import window_nll
from ..plan import PrunePlan
from .engine import Engine, RunSettings, add_lora, set_activation_checkpointing
from .sharding import is_sharded, shard_model

# The end-of-search fit should trim a rounding remainder; cutting more than this fraction of the dense
# size at once means the search did not follow its budget schedule (seen: LoRA + distillation at 50%).
FIT_WARN_FRACTION = 0.02


class SearchModule(nn.Module):
    """Model + masks as one module, so Accelerate/DDP synchronises ratio and weight gradients alike."""

    def __init__(self, model: nn.Module, masks: ModelMasks):
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def resolve_budget(model, config: DMSConfig, target_params: float | None = None,
                   target_ratio: float | None = None) -> tuple[int, int]:
    """(target, dense) parameter counts, checked before any compute: the target (the one given here, else
    the config's) lies below the dense model and above the smallest model these structures can reach."""
    if target_params is None and target_ratio is None:
        target_params, target_ratio = config.target_params, config.target_ratio
    if target_params is None and target_ratio is None:
        raise ValueError("no budget: give DMSConfig(target_ratio=...) or DMSConfig(target_params=...)")
    arch_spec(model.config)
    masks = ModelMasks.for_method(model.config, config)
    counter = ParameterCounter(model)
    dense = counter.dense()
    minimum = smallest_reachable(counter, masks)
    return resolve_target(dense, minimum, target_params, target_ratio, ",".join(config.structures)), dense


def check_pruned(pruned, probe: torch.Tensor, masked_logits: torch.Tensor, plan: PrunePlan) -> float:
    """The max abs difference between the pruned model's logits and the binarised masked model's on
    `probe`; the pruned model's size must be the plan's."""
    with torch.no_grad():
        logits = pruned(input_ids=probe.to(pruned.device), use_cache=False).logits.float()
    numel = sum(p.numel() for p in pruned.parameters())
    if numel != plan.params_after:
        raise RuntimeError(f"pruned model has {numel:,} parameters, the plan says {plan.params_after:,}")
    return float((logits - masked_logits.to(logits.device)).abs().max())


def score(pruned, plan: PrunePlan, probe, masked_logits, heldout=None, batch_size: int = 8, say=print) -> None:
    """Record in the plan the parity of the pruned model with the masked one, and its held-out loss."""
    parity = check_pruned(pruned, probe, masked_logits, plan)
    plan.metadata.masked_vs_pruned_max_abs_logit_diff = parity
    if heldout is not None and len(heldout):
        plan.metadata.heldout_loss = heldout_loss(pruned, heldout, batch_size)
        say(f"held-out calibration loss of the pruned model: {plan.metadata.heldout_loss:.4f} ({len(heldout)} blocks)")
    before, target = plan.params_before, plan.metadata.target_params
    say(f"pruned: {plan.params_after:,} parameters ({plan.params_after / before:.2%} of dense, "
        f"{(target - plan.params_after) / target:.3%} under target); masked vs pruned logits max diff {parity:.2e}")


def heldout_loss(model, heldout: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss of `model` on the held-out calibration blocks (what --restarts ranks by)."""
    nll, tokens = window_nll(model, heldout, batch_size=batch_size, progress=False)
    return nll / tokens


class SearchLoop:
    """One search step: schedule, budget term, importance update, refine (DMS sections 1 and 3)."""

    def __init__(self, engine: Engine, module: SearchModule, masks: ModelMasks, counter: ParameterCounter,
                 blocks: torch.Tensor, config: DMSConfig, target: int, teacher, weight_params):
        self.engine, self.masks, self.counter, self.blocks, self.c = engine, masks, counter, blocks, config
        self.target, self.teacher = target, teacher
        self.dense = counter.dense()
        self.final_ratio = target / self.dense
        self.refine_start = int(math.ceil(config.schedule_fraction * config.steps))
        groups = [{"params": masks.ratio_parameters(), "lr": config.ratio_lr, "weight_decay": 0.0}]
        weights = [p for p in weight_params if p.requires_grad]
        if weights:
            groups.append({"params": weights, "lr": config.weight_lr, "weight_decay": 0.0})
        self.module, self.optimizer = engine.prepare(module, torch.optim.AdamW(groups, betas=(0.9, 0.999)))

    def step(self, step: int, batches: list[torch.Tensor] | None = None) -> dict:
        """Optimiser step number `step` on the micro-batches `batches` (default: the engine's draw from the
        calibration blocks); returns its metrics."""
        c, engine = self.c, self.engine
        batches = engine.micro_batches(self.blocks) if batches is None else batches
        refining = step >= self.refine_start
        if refining:  # refine: heads and depth (with hold_budget the hidden width too) are binarised and stop moving
            self.masks.freeze_discrete(hidden=c.hold_budget)
        p = min(1.0, step / max(1.0, c.schedule_fraction * c.steps))
        target_ratio = self.final_ratio**p  # t(p) = final ** p, descending over the scheduled steps
        budget = {}

        def budget_term() -> torch.Tensor:  # once per step: the masks are shared by every micro-batch
            budget["loss"] = budget_loss(self.counter.masked(self.masks) / self.dense, target_ratio, c.budget_weight,
                                         two_sided=c.hold_budget and refining)
            return budget["loss"].float()

        teacher = self.teacher if c.distill else None
        totals = engine.accumulate(self.module, batches, teacher, c.distill_weight, c.distill_temperature,
                                   last_micro_loss=budget_term)
        engine.average_gradients(self.masks.ratio_parameters())
        self.masks.update_importance(grad_scale=engine.grad_scale(), all_reduce=engine.mean_over_ranks)
        for _, topk in self.masks.named_structures():
            if topk.frozen:
                topk.ratio.grad = None
        engine.optimizer_step(self.optimizer)
        self.masks.clamp_()
        params = self.counter.hard(self.masks)
        bl = float(budget["loss"].detach())
        metrics = {"loss": totals["task_loss"] + c.distill_weight * totals["distill_loss"] + bl, **totals,
                   "budget_loss": bl, "params": params, "params_ratio": params / self.dense,
                   "target_ratio_now": target_ratio, "target_params": self.target,
                   "phase": "refine" if refining else "search"}
        if self.masks.hidden is not None:  # the coarsest width: one aligned step of it moves `params` by percents
            metrics["hidden_kept"] = self.masks.hidden.kept()
        return metrics


def prepare_weights(config: DMSConfig, run: RunSettings, model, masks):
    """Freeze, wrap in LoRA or unfreeze the weights; returns (module to hook, peft model or None,
    trainable weights, teacher callable or None)."""
    model.requires_grad_(False)
    hooked, peft_model, weight_params, teacher = model, None, [], None
    if config.train_weights == "lora":
        peft_model, _ = add_lora(model, config.lora_r, config.lora_alpha)
        hooked = peft_model.base_model.model  # hooks go on the LoRA-wrapped projections: both branches masked
        weight_params = [p for p in peft_model.parameters() if p.requires_grad]
    elif config.train_weights == "full":
        if config.distill:
            teacher_model = copy.deepcopy(model).eval()  # full training changes the weights: keep a frozen copy
            teacher = lambda ids: teacher_model(input_ids=ids, use_cache=False).logits  # noqa: E731
        model.requires_grad_(True)
        weight_params = list(model.parameters())
    if run.gradient_checkpointing:
        set_activation_checkpointing(hooked, True)
    if config.distill and teacher is None:
        # Frozen weights or LoRA: the teacher is the same module with masks (and adapters) off.
        def teacher(ids):
            with masks.disabled():
                if peft_model is not None:
                    with peft_model.disable_adapter():
                        return hooked(input_ids=ids, use_cache=False).logits
                return hooked(input_ids=ids, use_cache=False).logits

    return hooked, peft_model, weight_params, teacher


def warm_up_importance(engine: Engine, module, masks: ModelMasks, blocks: torch.Tensor, n: int, batch_size: int) -> None:
    """Importances = the mean Taylor score of the unmasked model over the first `n` blocks (split over
    the processes), so the search's first masks rank elements on n blocks rather than one."""
    from .engine import next_token_loss

    acc, sums = engine.acc, {}
    # Every backward is a collective under DDP and FSDP, so every rank runs the same number of micro-batches:
    # n is rounded down to whole rounds of (processes x batch size), with at least one round.
    per_round = acc.num_processes * batch_size
    rounds = max(1, min(n, len(blocks)) // per_round)
    for r in range(rounds):
        start = (r * acc.num_processes + acc.process_index) * batch_size
        ids = blocks[start : start + batch_size].to(acc.device)
        with engine.autocast():
            engine.backward(next_token_loss(module(ids), ids))
        for name, score in masks.take_scores().items():
            sums[name] = sums.get(name, 0) + score
    engine.module.zero_grad(set_to_none=True)  # the warm-up only measures: no gradient is kept
    for name, topk in masks.named_structures():
        mine = sums.get(name, torch.zeros(topk.n, device=acc.device)) / rounds
        topk.importance.copy_(engine.mean_over_ranks(mine))
    engine.say(f"importances warmed up on {rounds * per_round} blocks")


def shard(model, config: DMSConfig, engine: Engine) -> None:
    """FSDP2 over the frozen weights (`shard_model`), unless the model was loaded sharded."""
    if engine.acc.num_processes < 2:
        raise ValueError("fsdp shards the weights across processes: launch two or more (accelerate launch / torchrun)")
    if config.train_weights != "none":
        raise ValueError("fsdp shards frozen weights only: use train_weights none (distillation is fine)")
    if not is_sharded(model):
        shard_model(model)


def fit_architecture(engine: Engine, masks, counter, target: int, dense: int, config: DMSConfig) -> dict:
    """Align the hard architecture with the budget, saying when that cut more than a rounding remainder."""
    if not config.fit_budget:
        params = counter.hard(masks)
        return {"scale": 1.0, "params": params, "params_before": params, "rescaled": "none (fit_budget off)"}
    fit = fit_to_budget(masks, counter, target)
    overshoot = (fit["params_before"] - target) / dense
    if overshoot > FIT_WARN_FRACTION:
        engine.say(f"WARNING: the search ended {overshoot:.1%} of the dense size above the budget, so the final fit cut "
                   f"{fit['params_before'] - fit['params']:,} parameters at once ({fit['rescaled']} scaled by {fit['scale']:.3f}) "
                   f"without the search adapting to it. More --steps let the search follow its schedule (LoRA/distillation "
                   f"searches resist pruning more): on SmolLM2 at 50%, 480 steps instead of 240 met the budget and scored "
                   f"better on validation, while --budget-weight 4 met it and scored far worse (docs/RESULTS.md 13).")
    if fit["params"] > fit["params_before"]:
        engine.say(f"the search ended at {fit['params_before']:,} parameters, under the budget: MLP widths scaled by "
                   f"{fit['scale']:.4f} to use {fit['params'] - fit['params_before']:,} of the unused parameters")
    return fit


def masked_model_logits(hooked, masks, probe: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), masks.hard():
        return hooked(input_ids=probe, use_cache=False).logits.float()


def plan_hash_per_rank(plan: PrunePlan, accelerator) -> list[str]:
    """Every rank must reach the same plan (identical masks and importances); checked, not assumed."""
    digest = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()
    if accelerator.num_processes == 1:
        return [digest]
    from accelerate.utils import gather_object

    hashes = gather_object([digest])
    if len(set(hashes)) != 1:
        raise RuntimeError(f"data-parallel ranks reached different plans: {hashes}")
    return hashes
