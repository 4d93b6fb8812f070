"""The parameter budget: one count formula, the budget loss, and fitting the hard architecture to a budget.

`architecture_parameters(...)` is written once over plain numbers and serves everything that counts:
fed Python ints it is the exact parameter count of a pruned model (plans, every baseline); fed
straight-through tensors (value = hard kept count, gradient = that of the soft count, DMS section 3) it
is the differentiable budget term whose value still equals the count extraction will produce.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from .arch import BiasFacts, Shapes, bias_facts, model_shapes


def architecture_parameters(shapes: Shapes, biases: BiasFacts, hidden, kv_groups, channels, attn_gates, mlp_gates):
    """Parameters of a model with `hidden` channels and, per layer, `kv_groups[l]` KV groups,
    `channels[l]` MLP channels, and sublayer presence `attn_gates[l]` / `mlp_gates[l]` (0 or 1).

    A sublayer with no heads (channels) left is absent, its norm and output bias with it.
    """
    d, h = shapes.head_dim, hidden
    total = shapes.vocab_size * h * (1 if shapes.tie_word_embeddings else 2) + h  # embeddings + final norm
    for layer in range(shapes.num_layers):
        g, c = kv_groups[layer], channels[layer]
        q_out, kv_out = g * shapes.n_rep(layer) * d, g * d
        attn = 2 * h * q_out + 2 * h * kv_out + h  # q, o, k, v, input norm
        if biases.qkv:
            attn = attn + q_out + 2 * kv_out
        if biases.o:
            attn = attn + h
        total = total + attn * attn_gates[layer] * (1 if _value(g) > 0 else 0)
        mlp = 3 * h * c + h  # gate, up, down, post-attention norm
        if biases.gate_up:
            mlp = mlp + 2 * c
        if biases.down:
            mlp = mlp + h
        total = total + mlp * mlp_gates[layer] * (1 if _value(c) > 0 else 0)
    return total


def _value(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


class ParameterCounter:
    """Counts parameters of the dense model, of a masked model (differentiably), of kept sizes and of plans.

    `model_or_config`: a model, its config, or a config dict. `output_bias` ({"attention": bool, "mlp":
    bool}) adds o_proj / down_proj biases the family lacks (FLAP's bias compensation).
    """

    def __init__(self, model_or_config, output_bias: dict | None = None):
        config = getattr(model_or_config, "config", model_or_config)
        self.shapes = model_shapes(SimpleNamespace(**config) if isinstance(config, dict) else config)
        biases = bias_facts(config)
        ob = output_bias or {}
        self.biases = dataclasses.replace(biases, o=biases.o or bool(ob.get("attention")),
                                          down=biases.down or bool(ob.get("mlp")))

    def count(self, hidden, kv_groups, channels, attn_gates, mlp_gates):
        return architecture_parameters(self.shapes, self.biases, hidden, kv_groups, channels, attn_gates, mlp_gates)

    def sizes(self, kv_groups: list[int], channels: list[int], hidden: int | None = None) -> int:
        """Exact count of a model with these kept sizes per layer (a zero removes that sublayer)."""
        ones = [1] * self.shapes.num_layers
        return int(self.count(self.shapes.hidden_size if hidden is None else hidden, kv_groups, channels, ones, ones))

    def dense(self) -> int:
        return self.sizes(list(self.shapes.num_kv_heads), list(self.shapes.intermediate))

    def masked(self, masks) -> torch.Tensor:
        """Straight-through count (float64 scalar) of `ModelMasks`: exact value, gradient to every kept ratio.

        It computes its own copy of every mask so that budget gradients never mix into the task
        gradients the importance scores are built from.
        """
        s = self.shapes
        st = lambda topk: topk.straight_through_count().double()  # noqa: E731
        hidden = st(masks.hidden) if masks.hidden is not None else s.hidden_size
        kv = [st(masks.heads[str(i)]) if str(i) in masks.heads else s.num_kv_heads[i] for i in range(s.num_layers)]
        ch = [st(masks.channels[str(i)]) if str(i) in masks.channels else s.intermediate[i] for i in range(s.num_layers)]
        gates = {name: masks.per_layer(topk.straight_through_mask().double()) for name, topk in masks.depth_gates.items()}
        attn, mlp = masks.sublayer_gates(gates, [1] * s.num_layers)
        return self.count(hidden, kv, ch, attn, mlp)

    def hard(self, masks) -> int:
        with torch.no_grad():
            return int(round(float(self.masked(masks))))


def budget_loss(current: torch.Tensor, target: float, weight: float, two_sided: bool = False) -> torch.Tensor:
    """lambda_res * max(0, log(R_current / R_target)): zero once the architecture fits the budget. With
    `two_sided`, lambda_res * |log(R_current / R_target)|: an architecture under the budget is pulled back up."""
    log_ratio = torch.log(current / target)
    return weight * (log_ratio.abs() if two_sided else torch.clamp(log_ratio, min=0.0))


def resolve_target(dense: int, minimum: int, target_params: float | None = None, target_ratio: float | None = None,
                   structures: str = "") -> int:
    """The budget in parameters (exactly one of `target_params` / `target_ratio`), checked to lie between
    the smallest reachable model and the dense one."""
    if (target_params is None) == (target_ratio is None):
        raise ValueError("give exactly one of target_params and target_ratio")
    target = int(target_params) if target_params is not None else int(target_ratio * dense)
    if target >= dense:
        raise ValueError(f"target {target:,} parameters is not below the dense model's {dense:,}")
    if target < minimum:
        raise ValueError(
            f"target {target:,} parameters is below the smallest model reachable by pruning {structures} ({minimum:,}); "
            "raise the budget or search more structures (--prune)"
        )
    return target


def smallest_reachable(counter: ParameterCounter, masks) -> int:
    """Parameter count with every searched structure at its minimum (embeddings usually dominate)."""
    saved = [t.ratio.detach().clone() for _, t in masks.named_structures()]
    for _, t in masks.named_structures():
        t.ratio.data.fill_(0.0)
        t.clamp_()
    minimum = counter.hard(masks)
    for (_, t), value in zip(masks.named_structures(), saved):
        t.ratio.data.copy_(value)
    return minimum


def largest_fitting(fits, lo: float, hi: float, iters: int = 60) -> float:
    """The largest x in [lo, hi] with `fits(x)`, given `fits(lo)` and that `fits` is monotone (60 halvings
    reach float precision). Every bisection over a kept fraction uses it (the fit below, the baselines)."""
    if fits(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit_to_budget(masks, counter: ParameterCounter, target: int) -> dict:
    """Rescale the kept ratios so the hard architecture uses the budget: the largest factor with
    count <= target.

    Above the target, the MLP widths are scaled down first (fine-grained, so the result lands close to
    the target), then all channel counts with the hidden width, and heads and depth only when channels
    alone cannot reach it. Below the target (the hard rounding of heads, depth or an aligned hidden width
    can leave a search there, and so can a scale-down that crossed a coarse step), the MLP widths are
    scaled up into the slack; the hidden width is left alone because one hidden channel costs a whole
    column of every layer, too coarse to fill with.
    """
    structures = [t for _, t in masks.named_structures()]
    mlp = list(masks.channels.values())
    before = counter.hard(masks)
    saved = {}

    def snapshot():
        saved.update({id(t): t.ratio.detach().clone() for t in structures})

    def count_at(alpha, group):
        with torch.no_grad():
            for t in structures:
                t.ratio.copy_(saved[id(t)] * (alpha if t in group else 1.0))
                t.clamp_()
        return counter.hard(masks)

    def fitting(group, lo, hi):  # the count is monotone in alpha
        return largest_fitting(lambda alpha: count_at(alpha, group) <= target, lo, hi)

    snapshot()
    scale, rescaled, params = 1.0, "none", before
    if before > target:
        groups = (("mlp channels", mlp), ("channels", [t for t in structures if t.kind == "channel"]), ("all", structures))
        for name, group in groups:
            if group and count_at(0.0, group) <= target:
                scale, rescaled = fitting(group, 0.0, 1.0), name
                params = count_at(scale, group)
                break
        else:
            count_at(1.0, [])
            raise ValueError(f"no rescaling of the kept ratios reaches {target} parameters")
        snapshot()
    if mlp and params < target:
        ceiling = max(1.0 / float(saved[id(t)]) for t in mlp)  # beyond it every MLP is whole
        up = fitting(mlp, 1.0, ceiling)
        grown = count_at(up, mlp)
        if grown > params:
            scale, params = scale * up, grown
            rescaled = "mlp channels up" if rescaled == "none" else f"{rescaled}, then mlp channels up"
    return {"scale": scale, "params": params, "params_before": before, "rescaled": rescaled}


def count_parameters(model) -> int:
    """Number of distinct parameters; a tied embedding / lm_head is counted once.

    Deduplicates by storage as well as by object, so weights tied by sharing a tensor (not the same
    Parameter) are not counted twice either."""
    from torch.distributed.tensor import DTensor

    seen: set = set()
    total = 0
    for p in model.parameters():
        if p.device.type == "meta" or isinstance(p, DTensor):  # no storage of the whole tensor to compare
            key = ("id", id(p))
        else:
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()))
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total
