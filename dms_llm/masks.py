"""The searchable structures of one Llama-family model and the mask tensors the hooks apply.

`ModelMasks` holds one `DifferentiableTopK` per structure:

| name             | elements                   | kind    |
|------------------|----------------------------|---------|
| `heads.{l}`      | KV groups of layer l       | head    |
| `channels.{l}`   | MLP channels of layer l    | channel |
| `hidden`         | hidden channels (global)   | channel |
| `attn_layers`    | attention sublayers        | layer   |  (depth="sublayer", the default)
| `mlp_layers`     | MLP sublayers              | layer   |
| `layers`         | whole blocks               | layer   |  (depth="block", the paper's mode)

`spared_layers` are kept whole: they get no head or channel structure, and the depth gates rank only
the other layers (LLM-Pruner's practice of sparing the first and last layers). The hidden dimension is
one global structure and stays searchable.

Before every forward, `refresh()` computes each structure's mask once (soft while searching, hard for
the binarised model) and the derived per-module scales the hooks multiply by.

Taylor importance, per `DMSConfig.importance`:
- `block` (the paper): a gradient hook on each base mask gets dL/dm summed over batch, tokens and every
  module that uses the mask; the score of a step is (m * dL/dm)^2.
- `token`: the hooks hand `watch()` each masked activation y = m * x; a gradient hook on it gets each
  token's contribution y * dL/dy (summed over a head's columns, and over every site of the hidden mask),
  and the score is the sum over tokens of its square. Contributions of opposite sign no longer cancel
  inside a block, so one block ranks elements on its tokens rather than on their sum. Depth gates, and the
  hidden mask's share through the RMSNorm statistic (the same for every channel), keep the block score.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .arch import model_shapes
from .dtopk import DifferentiableTopK
from .method import DEPTH_MODES, STRUCTURES, DMSConfig, parse_structures
from .plan import LayerPlan, PrunePlan, count_plan_parameters


class ModelMasks(nn.Module):
    """Learnable kept ratios and importances for the chosen structures of a model (config only);
    `method` supplies the operator's temperatures, EMA decay and minimum kept counts."""

    def __init__(self, config, structures=STRUCTURES, depth: str = "sublayer", spared_layers=(),
                 method: DMSConfig | None = None):
        super().__init__()
        if depth not in DEPTH_MODES:
            raise ValueError(f"depth must be one of {DEPTH_MODES}, got {depth!r}")
        self.structures = parse_structures(structures)
        self.depth = depth
        self.shapes = model_shapes(config)
        s = self.shapes
        self.spared_layers = sorted(set(spared_layers))
        if any(not 0 <= layer < s.num_layers for layer in self.spared_layers):
            raise ValueError(f"spared layers {self.spared_layers} must lie in 0..{s.num_layers - 1}")
        searched = [layer for layer in range(s.num_layers) if layer not in self.spared_layers]
        self.heads = nn.ModuleDict()
        self.channels = nn.ModuleDict()
        if "heads" in self.structures:
            for layer in searched:
                if s.num_kv_heads[layer]:
                    self.heads[str(layer)] = DifferentiableTopK(s.num_kv_heads[layer], "head", method)
        if "channels" in self.structures:
            for layer in searched:
                if s.intermediate[layer]:
                    self.channels[str(layer)] = DifferentiableTopK(s.intermediate[layer], "channel", method)
        self.hidden = DifferentiableTopK(s.hidden_size, "channel", method) if "hidden" in self.structures else None
        self.depth_gates = nn.ModuleDict()
        # Element i of a depth gate is layer gated_layers[i]; spared layers have a constant gate of 1.
        self.register_buffer("gated_layers", torch.tensor(searched, dtype=torch.long), persistent=False)
        if "layers" in self.structures and searched:
            names = ("attn_layers", "mlp_layers") if depth == "sublayer" else ("layers",)
            for name in names:
                self.depth_gates[name] = DifferentiableTopK(len(searched), "layer", method)
        self.mode = "soft"
        self.enabled = True
        self.current: dict[str, torch.Tensor | float] = {}
        self.per_token = (method or DMSConfig()).importance == "token"
        self._taylor: dict[str, torch.Tensor] = {}  # block scores: m * dL/dm, summed since the last update
        self._token_sq: dict[str, torch.Tensor] = {}  # token scores: sum over finished backwards of (y dL/dy)^2
        self._token_now: dict[str, torch.Tensor] = {}  # this backward's per-token contributions
        self._tracking = False

    @classmethod
    def for_method(cls, config, method: DMSConfig) -> "ModelMasks":
        """The structures `method` searches on a model with `config` (spared layers included)."""
        return cls(config, method.structures, method.depth, method.spared_layers(config.num_hidden_layers), method)

    # ----- enumeration -------------------------------------------------------------------------
    def named_structures(self):
        for layer, topk in self.heads.items():
            yield f"heads.{layer}", topk
        for layer, topk in self.channels.items():
            yield f"channels.{layer}", topk
        if self.hidden is not None:
            yield "hidden", self.hidden
        yield from self.depth_gates.items()

    def ratio_parameters(self) -> list[nn.Parameter]:
        return [topk.ratio for _, topk in self.named_structures()]

    def clamp_(self) -> None:
        for _, topk in self.named_structures():
            topk.clamp_()

    def freeze_discrete(self, hidden: bool = False) -> None:
        """Refine phase: heads and depth gates (and with `hidden` the hidden width) become binary
        (straight-through) and stop moving."""
        for name, topk in self.named_structures():
            if topk.kind in ("head", "layer") or (hidden and name == "hidden"):
                topk.frozen = True

    # ----- per-forward masks -------------------------------------------------------------------
    def _base_mask(self, name: str, topk: DifferentiableTopK, track: bool) -> torch.Tensor:
        if self.mode == "hard":
            return topk.hard_mask().to(topk.ratio.device)
        mask = topk.soft_mask()
        if track and mask.requires_grad and not (self.per_token and topk.kind != "layer"):
            acc = self._taylor.setdefault(name, torch.zeros(topk.n, device=mask.device))
            detached = mask.detach()
            mask.register_hook(lambda grad, acc=acc, m=detached: acc.add_(m * grad.detach().float()))
        return mask

    def refresh(self, track_importance: bool = True) -> dict:
        """Compute this forward's masks and the scales the hooks use; returns `self.current`."""
        s = self.shapes
        track = track_importance and torch.is_grad_enabled()
        self._fold_tokens()  # the previous micro-batch's backward is complete: square its tokens' contributions
        self._tracking = track and self.per_token and self.mode == "soft"
        cur: dict[str, torch.Tensor | float] = {}
        hidden = self._base_mask("hidden", self.hidden, track) if self.hidden is not None else None
        if hidden is not None:
            cur["hidden"] = hidden
            # RMSNorm over kept channels only: scaling the input by sqrt(D / sum m) makes the norm's
            # mean(x^2) equal sum(x^2) / sum(m); the output is scaled back (see inject.py).
            cur["norm_scale"] = torch.sqrt(s.hidden_size / hidden.sum())
        gates = {name: self.per_layer(self._base_mask(name, topk, track)) for name, topk in self.depth_gates.items()}
        attn_gates, mlp_gates = self.sublayer_gates(gates, [None] * s.num_layers)
        for layer in range(s.num_layers):
            attn_scale, mlp_scale = hidden, hidden
            attn_gate, mlp_gate = attn_gates[layer], mlp_gates[layer]
            heads = self.heads[str(layer)] if str(layer) in self.heads else None
            if heads is not None:
                group_mask = self._base_mask(f"heads.{layer}", heads, track)
                cur[f"heads.{layer}"] = group_mask.repeat_interleave(s.n_rep(layer) * s.head_dim)
                if self.mode == "hard" and heads.kept() == 0:
                    # No heads left means no attention sublayer, o_proj bias included.
                    attn_gate = torch.zeros((), device=group_mask.device)
            channels = self.channels[str(layer)] if str(layer) in self.channels else None
            if channels is not None:
                cur[f"channels.{layer}"] = self._base_mask(f"channels.{layer}", channels, track)
            cur[f"attn_out.{layer}"] = _combine(attn_gate, attn_scale)
            cur[f"mlp_out.{layer}"] = _combine(mlp_gate, mlp_scale)
        self.current = cur
        return cur

    @staticmethod
    def sublayer_gates(gates: dict, ungated: list) -> tuple:
        """(attention gates, MLP gates), one per layer, from the depth gates by name: `layers` (depth "block")
        gates both sublayers of a layer, `attn_layers` / `mlp_layers` (depth "sublayer") one each; `ungated`
        (one value per layer) where the depth is not searched."""
        if "layers" in gates:
            return gates["layers"], gates["layers"]
        return gates.get("attn_layers", ungated), gates.get("mlp_layers", ungated)

    def per_layer(self, gate: torch.Tensor) -> torch.Tensor:
        """A depth gate's mask over all layers: spared layers read 1 (differentiable in `gate`)."""
        if not self.spared_layers:
            return gate
        full = torch.ones(self.shapes.num_layers, dtype=gate.dtype, device=gate.device)
        return full.index_copy(0, self.gated_layers.to(gate.device), gate)

    # ----- importance --------------------------------------------------------------------------
    def watch(self, key: str, masked: torch.Tensor) -> None:
        """Per-token importance: record each token's y * dL/dy at a hook site whose output `masked` is the
        activation times the mask `self.current[key]`. A no-op unless this forward tracks per-token scores."""
        if not self._tracking or not masked.requires_grad:
            return
        name, topk = self._token_structure(key)
        if topk is None:
            return
        values = masked.detach()

        def record(grad, name=name, n=topk.n, values=values):
            # the columns of one element are contiguous (a head's KV group spans n_rep * head_dim of them)
            per_token = (values * grad).float().reshape(-1, n, values.shape[-1] // n).sum(-1)
            previous = self._token_now.get(name)
            self._token_now[name] = per_token if previous is None else previous + per_token

        masked.register_hook(record)

    def _token_structure(self, key: str):
        kind, _, layer = key.partition(".")
        if kind == "heads":
            return key, self.heads[layer] if layer in self.heads else None
        if kind == "channels":
            return key, self.channels[layer] if layer in self.channels else None
        if kind in ("hidden", "attn_out", "mlp_out") and self.hidden is not None:
            return "hidden", self.hidden
        return key, None

    def _fold_tokens(self) -> None:
        for name, per_token in self._token_now.items():
            square = per_token.pow(2).sum(0)
            self._token_sq[name] = square if name not in self._token_sq else self._token_sq[name] + square
        self._token_now = {}

    def take_scores(self, grad_scale: float = 1.0, all_reduce=None) -> dict[str, torch.Tensor]:
        """Each structure's Taylor score gathered since the last call (and forget it): (m dL/dm)^2 of the
        summed gradient (block), or the sum of its tokens' squared contributions (token).

        `grad_scale` undoes a loss scaler; `all_reduce(tensor)` averages across data-parallel ranks (the
        gradient before squaring for block scores), so every rank gets identical scores."""
        self._fold_tokens()
        scores = {}
        for name, acc in sorted(self._taylor.items()):
            score = acc / grad_scale
            scores[name] = (all_reduce(score) if all_reduce is not None else score).pow(2)
        for name, square in sorted(self._token_sq.items()):
            score = square / grad_scale**2
            scores[name] = all_reduce(score) if all_reduce is not None else score
        self.discard_importance()
        return scores

    @torch.no_grad()
    def update_importance(self, grad_scale: float = 1.0, all_reduce=None) -> int:
        """Fold the Taylor scores gathered since the last call into the EMA; once per optimiser step.
        Returns the number of structures updated."""
        structures = dict(self.named_structures())
        scores = self.take_scores(grad_scale, all_reduce)
        return sum(bool(structures[name].update_importance(score)) for name, score in scores.items())

    def discard_importance(self) -> None:
        self._taylor, self._token_sq, self._token_now = {}, {}, {}

    # ----- modes -------------------------------------------------------------------------------
    @contextmanager
    def hard(self):
        previous, self.mode = self.mode, "hard"
        try:
            yield self
        finally:
            self.mode = previous

    @contextmanager
    def disabled(self):
        """The unmasked model (e.g. the distillation teacher) without removing the hooks."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    # ----- extraction --------------------------------------------------------------------------
    def sublayer_kept(self) -> tuple[list[bool], list[bool]]:
        """Which attention / MLP sublayers the hard depth gates keep (all, when depth is not searched)."""
        n = self.shapes.num_layers
        gates = {name: self.per_layer(topk.hard_mask()).bool().tolist() for name, topk in self.depth_gates.items()}
        return self.sublayer_gates(gates, [True] * n)

    def to_plan(self, config, source_model: str = ""):
        """The `PrunePlan` of the hard masks: what extraction will keep, by the same top-k rule."""
        s = self.shapes
        attn_on, mlp_on = self.sublayer_kept()
        layers = []
        for i in range(s.num_layers):
            heads = self.heads[str(i)].kept_indices() if str(i) in self.heads else list(range(s.num_kv_heads[i]))
            chans = self.channels[str(i)].kept_indices() if str(i) in self.channels else list(range(s.intermediate[i]))
            layers.append(LayerPlan(heads if attn_on[i] else [], chans if mlp_on[i] else []))
        hidden = self.hidden.kept_indices() if self.hidden is not None else list(range(s.hidden_size))
        dense = PrunePlan.dense(config, source_model=source_model)
        plan = PrunePlan(
            source_model=dense.source_model,
            source_model_type=dense.source_model_type,
            source_config=dense.source_config,
            hidden_channels=hidden,
            layers=layers,
            params_before=dense.params_before,
        )
        plan.params_after = count_plan_parameters(plan)
        return plan

    # ----- reporting ---------------------------------------------------------------------------
    def kept_indices(self) -> dict[str, list[int]]:
        return {name: topk.kept_indices() for name, topk in self.named_structures()}


def _combine(gate, hidden):
    """The factor a sublayer's output is multiplied by: its depth gate times the hidden mask."""
    if gate is None:
        return hidden
    if hidden is None:
        return gate
    return gate * hidden

