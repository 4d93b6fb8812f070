"""The parameter count of the architecture the masks describe: one formula for the loss and the check.

`architecture_parameters(...)` is written once over plain numbers. Given Python ints it is the exact
count of a pruned model; given straight-through tensors (value = hard kept count, gradient = that of
the soft count, DMS section 3) it is the differentiable budget term whose value still equals the
parameter count extraction will produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ModelParts, Shapes
from .masks import ModelMasks


@dataclass(frozen=True)
class BiasFacts:
    qkv: bool
    o: bool
    gate_up: bool
    down: bool


def bias_facts(model: nn.Module) -> BiasFacts:
    """Read which projections carry a bias from the modules themselves (Qwen2: q/k/v only)."""
    parts = ModelParts(model)
    has = lambda m: m is not None and getattr(m, "bias", None) is not None  # noqa: E731
    attn_layer = next((i for i, kv in enumerate(parts.shapes.num_kv_heads) if kv), None)
    mlp_layer = next((i for i, n in enumerate(parts.shapes.intermediate) if n), None)
    return BiasFacts(
        qkv=attn_layer is not None and has(parts.attn_proj(attn_layer, "q")),
        o=attn_layer is not None and has(parts.attn_proj(attn_layer, "o")),
        gate_up=mlp_layer is not None and has(parts.mlp_proj(mlp_layer, "gate")),
        down=mlp_layer is not None and has(parts.mlp_proj(mlp_layer, "down")),
    )


def architecture_parameters(shapes: Shapes, biases: BiasFacts, hidden, kv_groups, channels, attn_gates, mlp_gates):
    """Parameters of a model with `hidden` channels and, per layer, `kv_groups[l]` KV groups,
    `channels[l]` MLP channels, and sublayer presence `attn_gates[l]` / `mlp_gates[l]` (0 or 1).

    A sublayer with no heads left is absent (its norm and o_proj bias go with it).
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
    """Counts parameters of the dense model, of a masked model (differentiably) and of plans."""

    def __init__(self, model: nn.Module):
        self.shapes = ModelParts(model).shapes
        self.biases = bias_facts(model)

    def count(self, hidden, kv_groups, channels, attn_gates, mlp_gates):
        return architecture_parameters(self.shapes, self.biases, hidden, kv_groups, channels, attn_gates, mlp_gates)

    def dense(self) -> int:
        s = self.shapes
        ones = [1] * s.num_layers
        return int(self.count(s.hidden_size, list(s.num_kv_heads), list(s.intermediate), ones, ones))

    def masked(self, masks: ModelMasks) -> torch.Tensor:
        """Straight-through count (float64 scalar): exact value, gradient to every kept ratio.

        It computes its own copy of every mask so that budget gradients never mix into the task
        gradients the importance scores are built from.
        """
        s = self.shapes
        st = lambda topk: topk.straight_through_count().double()  # noqa: E731
        hidden = st(masks.hidden) if masks.hidden is not None else s.hidden_size
        kv = [st(masks.heads[str(i)]) if str(i) in masks.heads else s.num_kv_heads[i] for i in range(s.num_layers)]
        ch = [st(masks.channels[str(i)]) if str(i) in masks.channels else s.intermediate[i] for i in range(s.num_layers)]
        gates = {name: masks.per_layer(topk.straight_through_mask().double()) for name, topk in masks.depth_gates.items()}
        one = [1] * s.num_layers
        attn = gates.get("layers", gates.get("attn_layers", one))
        mlp = gates.get("layers", gates.get("mlp_layers", one))
        return self.count(hidden, kv, ch, attn, mlp)

    def hard(self, masks: ModelMasks) -> int:
        with torch.no_grad():
            return int(round(float(self.masked(masks))))


def budget_loss(current: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """lambda_res * max(0, log(R_current / R_target)): zero once the architecture fits the budget."""
    return weight * torch.clamp(torch.log(current / target), min=0.0)
