"""What every baseline shares: per-structure weight groups, calibration statistics, and turning scores
into a `PrunePlan` that meets a parameter budget as the shared counter (`budget.ParameterCounter`) counts
it, with the search's kept-count rule (`dtopk.kept_count`).

Structures are the ones DMS searches (docs/DESIGN.md, "Where the masks act"): the KV groups of each layer (a key/value head with
its n_rep query heads: q/k/v rows + o_proj columns) and the MLP channels of each layer (gate/up rows +
down_proj column). Hidden channels are never pruned by the baselines (none of the papers do).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ModelParts
from ..budget import ParameterCounter, largest_fitting
from ..dtopk import kept_count
from ..method import DEFAULT_ALIGN
from ..plan import LayerPlan, PlanError, PrunePlan, count_plan_parameters
from ..passes import batches, model_device, removed_after
from ..prune import head_rows


class BudgetError(ValueError):
    """The budget cannot be met by the method (e.g. below what pruning these structures can reach)."""


# ----- weights of each structure --------------------------------------------------------------------


def group_rows(parts: ModelParts, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, key/value rows) of every KV group of `layer`, as [groups, n_rep*head_dim] and
    [groups, head_dim] index tensors; o_proj's input columns are the query rows."""
    s = parts.shapes
    groups = list(range(s.num_kv_heads[layer]))
    q = head_rows(groups, s.n_rep(layer), s.head_dim).view(len(groups), -1)
    kv = head_rows(groups, 1, s.head_dim).view(len(groups), -1)
    return q, kv


def per_group(values: torch.Tensor, parts: ModelParts, layer: int) -> torch.Tensor:
    """Sum a per-o_proj-input-column quantity [n_heads*head_dim] over each KV group's columns."""
    q, _ = group_rows(parts, layer)
    return values.float()[q.to(values.device)].sum(dim=1)


def weight_sq_norms(parts: ModelParts, layer: int, fn=lambda w: w.float().pow(2)) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per KV group and per MLP channel: sum of `fn(weight)` over the structure's weights (q/k/v rows + o
    columns; gate/up rows + down column). With the default `fn` these are squared L2 norms."""
    s = parts.shapes
    heads = chans = None
    if s.num_kv_heads[layer]:
        q_rows, kv_rows = group_rows(parts, layer)
        q, k, v, o = (parts.attn_proj(layer, w).weight for w in ("q", "k", "v", "o"))
        row_q, row_k, row_v = fn(q).sum(1), fn(k).sum(1), fn(v).sum(1)
        col_o = fn(o).sum(0)
        heads = row_q[q_rows].sum(1) + row_k[kv_rows].sum(1) + row_v[kv_rows].sum(1) + col_o[q_rows].sum(1)
    if s.intermediate[layer]:
        gate, up, down = (parts.mlp_proj(layer, w).weight for w in ("gate", "up", "down"))
        chans = fn(gate).sum(1) + fn(up).sum(1) + fn(down).sum(0)
    return heads, chans


# ----- calibration passes ---------------------------------------------------------------------------


class InputStats:
    """Per input feature of one linear layer over calibration tokens: count, sum and sum of squares
    (float64, so 100k-token variances of activations around 1e4 do not lose their digits)."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.sumsq = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sumsq = torch.zeros_like(self.sum)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each feature over all calibration tokens (Wanda's ||X_j||_2)."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Population variance over tokens (FLAP's fluctuation uses the sample variance; ranks agree)."""
        return (self.sumsq / self.n - self.mean.pow(2)).clamp_min(0)


@torch.no_grad()
def output_proj_input_stats(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, InputStats]:
    """Statistics of the inputs of every o_proj and down_proj on the calibration blocks (dense model,
    one forward pass per batch). Keys "{layer}.attention" / "{layer}.mlp"."""
    parts = ModelParts(model)
    stats: dict[str, InputStats] = {}
    handles = []
    for i in range(parts.shapes.num_layers):
        for kind, module in (("attention", parts.attn_proj(i, "o")), ("mlp", parts.mlp_proj(i, "down"))):
            if module is None:
                continue
            st = stats.setdefault(f"{i}.{kind}", InputStats())
            handles.append(module.register_forward_pre_hook(lambda m, args, st=st: st.update(args[0])))
    device = model_device(model)
    with removed_after(handles):
        for ids in batches(blocks, batch_size):
            model(input_ids=ids.to(device), use_cache=False)
    return stats


# ----- scores -> plans ------------------------------------------------------------------------------


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring indices, ascending; ties go to the lower index (deterministic)."""
    order = torch.argsort(-scores.double().cpu(), stable=True)
    return sorted(order[:k].tolist())


def build_plan(model: nn.Module, heads: dict[int, list[int]], channels: dict[int, list[int]], source_model: str | None,
               metadata: dict, output_bias: dict | None = None, output_bias_values: dict | None = None) -> PrunePlan:
    """A plan keeping `heads[l]` / `channels[l]` (all of a layer's elements when it is not listed)."""
    dense = PrunePlan.dense(model.config, source_model=source_model)
    layers = [
        LayerPlan(heads.get(i, lp.attention_groups), channels.get(i, lp.mlp_channels)) for i, lp in enumerate(dense.layers)
    ]
    plan = PrunePlan(
        source_model=dense.source_model, source_model_type=dense.source_model_type, source_config=dense.source_config,
        hidden_channels=dense.hidden_channels, layers=layers, params_before=dense.params_before, metadata=metadata,
        output_bias=output_bias, output_bias_values=output_bias_values,
    )
    plan.params_after = count_plan_parameters(plan)
    return plan


def check_budget(plan: PrunePlan, counted: int, target: int) -> PrunePlan:
    """The plan's count must equal the count of the sizes the allocation chose, and fit the budget."""
    if plan.params_after != counted:
        raise RuntimeError(f"count_plan_parameters gives {plan.params_after:,}, the allocation counted {counted:,}")
    if plan.params_after > target:
        raise RuntimeError(f"plan has {plan.params_after:,} parameters, above the target {target:,}")
    plan.metadata.target_params = int(target)
    plan.metadata.update(params=plan.params_after, budget_gap=(target - plan.params_after) / target)  # in `extra`
    return plan


def uniform_plan(model: nn.Module, head_scores: dict[int, torch.Tensor], channel_scores: dict[int, torch.Tensor],
                 target: int, source_model: str | None, metadata: dict, layers: list[int] | None = None,
                 align: int = DEFAULT_ALIGN) -> PrunePlan:
    """The same kept fraction in every pruned layer (`layers`, default all), top-k by score within a layer;
    MLP widths in multiples of `align` (the search's rule, `dtopk.kept_count`).

    KV groups come a few per layer (SmolLM2: 3), so heads and channels cannot always lose the same
    fraction: for each possible head fraction, the channel fraction that fills the budget is found by
    bisection on the shared formula, and the pair whose two fractions are closest is kept (ties: the
    larger model). Every pruned layer keeps at least one KV group and one channel.
    """
    counter = ParameterCounter(model)
    count = counter.sizes
    s = counter.shapes
    pruned = sorted(set(range(s.num_layers) if layers is None else layers))

    def sizes(fh: float, fc: float):
        kv = [kept_count(fh, s.num_kv_heads[i], 1) if i in pruned else s.num_kv_heads[i] for i in range(s.num_layers)]
        ch = [kept_count(fc, s.intermediate[i], 1, align) if i in pruned else s.intermediate[i] for i in range(s.num_layers)]
        return kv, ch

    def fraction(kept: list[int], dense) -> float:
        total = sum(dense[i] for i in pruned)
        return sum(kept[i] for i in pruned) / total if total else 1.0

    smallest = count(*sizes(0.0, 0.0))
    if smallest > target:
        raise BudgetError(
            f"target {target:,} is below the smallest model that uniform pruning of layers {pruned} reaches "
            f"({smallest:,}: one KV group and one channel per layer)"
        )
    # exact fractions k/n of every layer's group count (+ a hair, against rounding at the boundary)
    candidates = sorted({k / n + 1e-9 for n in {s.num_kv_heads[i] for i in pruned} if n for k in range(1, n + 1)} | {1.0})
    best = None
    for fh in candidates:
        if count(*sizes(fh, 0.0)) > target:
            continue
        fc = largest_fitting(lambda x: count(*sizes(fh, x)) <= target, 0.0, 1.0)
        kv, ch = sizes(fh, fc)
        h, c = fraction(kv, s.num_kv_heads), fraction(ch, s.intermediate)
        key = (round(abs(h - c), 12), -count(kv, ch))
        if best is None or key < best[0]:
            best = (key, kv, ch, h, c)
    _, kv, ch, h, c = best
    heads = {i: top_indices(head_scores[i], kv[i]) for i in pruned if s.num_kv_heads[i]}
    chans = {i: top_indices(channel_scores[i], ch[i]) for i in pruned if s.intermediate[i]}
    metadata = {**metadata, "keep_fraction_heads": h, "keep_fraction_channels": c, "pruned_layers": pruned, "align": align}
    plan = build_plan(model, heads, chans, source_model, metadata)
    return check_budget(plan, count(kv, ch), target)


def source_name(model: nn.Module, source_model: str | None) -> str:
    return source_model if source_model is not None else str(getattr(model.config, "_name_or_path", "") or "")


def check_target(model: nn.Module, target_params) -> int:
    target = int(target_params)
    dense = ParameterCounter(model).dense()
    if not 0 < target < dense:
        raise BudgetError(f"target {target:,} parameters must be positive and below the dense count {dense:,}")
    return target


__all__ = [
    "BudgetError", "InputStats", "PlanError", "build_plan", "check_budget", "output_proj_input_stats",
    "per_group", "top_indices", "uniform_plan", "weight_sq_norms",
]
