"""Hard pruning: slicing primitives and `prune_model(model, plan)`, which builds a new, smaller model.

    from dms_llm.plan import PrunePlan
    from dms_llm.prune import prune_model
    small = prune_model(model, PrunePlan.from_json("dms_plan.json"))   # `model` is left unchanged

The pruned model is built from `plan.pruned_config()` (never a patched copy of the source), then every
one of its parameters is filled exactly once from a sliced source tensor, with name and shape checks in
both directions: a pruned parameter without a rule, a shape that disagrees with the config, or a source
parameter that is neither copied nor part of a removed sublayer is an error, not a silent skip.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from .arch import arch_spec
from .plan import PlanError, PrunePlan

# The attribute of a pruned model that holds its plan (a plain attribute: no weights, not in config.json).
PLAN_ATTRIBUTE = "dms_plan"

# ----- primitives: pure functions of tensors, returning new tensors (never views of the source) -----


def slice_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep output features `rows` and input features `cols` (None keeps all); the bias follows rows."""
    w = weight if rows is None else weight.index_select(0, rows.to(weight.device))
    w = w if cols is None else w.index_select(1, cols.to(weight.device))
    b = None
    if bias is not None:
        b = bias if rows is None else bias.index_select(0, rows.to(bias.device))
        b = b.clone() if b is bias else b
    return (w.clone() if w is weight else w), b


def slice_norm(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return weight.index_select(0, idx.to(weight.device))


def head_rows(groups: list[int], n_rep: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads of KV groups `groups` in a projection with `n_rep` heads per group.

    With n_rep query heads per group, group g owns query heads g*n_rep .. g*n_rep+n_rep-1 (the order
    `repeat_kv` assumes); pass n_rep=1 for k/v rows. Each head is `head_dim` consecutive rows.
    """
    g = torch.as_tensor(groups, dtype=torch.long)
    heads = (g[:, None] * n_rep + torch.arange(n_rep)).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# ----- the model-level transformation ----------------------------------------------------------------


def _check_plan_matches(model: nn.Module, plan: PrunePlan) -> None:
    check_plan_matches_config(model.config, plan)


def check_plan_matches_config(config, plan: PrunePlan) -> None:
    """Raise PlanError when `plan` was made for another model than the one `config` describes."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if cfg.get("model_type") != plan.source_model_type:
        raise PlanError(f"plan is for a {plan.source_model_type!r} model, got {cfg.get('model_type')!r}")
    keys = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "head_dim", "tie_word_embeddings", "layer_num_key_value_heads", "layer_intermediate_sizes",
    )  # fmt: skip
    diff = [
        f"{k}: model {cfg.get(k)!r} != plan {plan.source_config.get(k)!r}"
        for k in keys
        if k in plan.source_config and cfg.get(k) != plan.source_config.get(k)
    ]
    if diff:
        raise PlanError("the plan was made for a different model: " + "; ".join(diff))


def _model_class(config):
    if config.model_type == "dms_llama":
        from .modeling import DMSLlamaForCausalLM

        return DMSLlamaForCausalLM
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def _index_sets(plan: PrunePlan, device) -> tuple[torch.Tensor, list[dict]]:
    s = plan.shapes
    hidden = torch.as_tensor(plan.hidden_channels, dtype=torch.long, device=device)
    per_layer = []
    for i, lp in enumerate(plan.layers):
        per_layer.append(
            dict(
                q=head_rows(lp.attention_groups, s.n_rep(i), s.head_dim).to(device),
                kv=head_rows(lp.attention_groups, 1, s.head_dim).to(device),
                ch=torch.as_tensor(lp.mlp_channels, dtype=torch.long, device=device),
                hidden=hidden,
            )
        )
    return hidden, per_layer


@dataclass(frozen=True)
class TensorRecipe:
    """How one parameter of the pruned model is made from the source: `source` sliced to `rows` x `cols`
    (None keeps all), or, for a plan-added output bias (`output_bias` = "attention" / "mlp"), the source
    bias of `source_layer` (zero when the source has none) plus the plan's delta."""

    name: str
    source: str
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    source_layer: int | None = None
    output_bias: str | None = None


class PlanSlicer:
    """The slicing rules of a plan, by parameter name; shared by `prune_model` (tensors in memory) and
    `dms_llm.checkpoints.stream_prune` (tensors read one at a time from the checkpoint files), so both produce the
    same bytes from the same source tensor."""

    def __init__(self, plan: PrunePlan, spec, device="cpu"):
        if plan.output_bias and any(plan.output_bias.values()) and plan.output_bias_values is None:
            raise PlanError("the plan adds output biases but carries no bias values (load it with PrunePlan.from_json, "
                            "which reads them from beside the plan file)")
        self.plan, self.spec = plan, spec
        self.hidden, self.per_layer = _index_sets(plan, device)
        self.kept = plan.kept_layers()
        self.prefix = f"{spec.decoder}.{spec.layers}."
        self.layer_re = re.compile(rf"^{re.escape(self.prefix)}(\d+)\.(.+)$")
        # rest of a layer parameter name (without .weight/.bias) -> (rows, cols) index-set keys
        self.layer_rules = {
            f"{spec.attn}.{spec.q}": ("q", "hidden"),
            f"{spec.attn}.{spec.k}": ("kv", "hidden"),
            f"{spec.attn}.{spec.v}": ("kv", "hidden"),
            f"{spec.attn}.{spec.o}": ("hidden", "q"),
            f"{spec.mlp}.{spec.gate}": ("ch", "hidden"),
            f"{spec.mlp}.{spec.up}": ("ch", "hidden"),
            f"{spec.mlp}.{spec.down}": ("hidden", "ch"),
            spec.attn_norm: ("hidden", None),
            spec.mlp_norm: ("hidden", None),
        }
        self.top_rules = {
            f"{spec.decoder}.{spec.embed}": (None, "hidden"),
            f"{spec.decoder}.{spec.final_norm}": ("hidden", None),
            spec.lm_head: (None, "hidden"),
        }
        # Plans may add output biases (FLAP's compensation): o_proj / down_proj biases the source may lack.
        self.out_bias_kinds = {f"{spec.attn}.{spec.o}": "attention", f"{spec.mlp}.{spec.down}": "mlp"}

    def recipe(self, name: str) -> TensorRecipe:
        """The recipe of pruned-model parameter `name` (layer indices are the pruned model's)."""
        module_path, _, kind = name.rpartition(".")
        m = self.layer_re.match(module_path)
        if m:
            j, rest = int(m.group(1)), m.group(2)
            src_layer = self.kept[j]
            src_name = f"{self.prefix}{src_layer}.{rest}.{kind}"
            rule, sets = self.layer_rules.get(rest), self.per_layer[src_layer]
        else:
            src_layer, src_name, rule, sets = None, name, self.top_rules.get(module_path), dict(hidden=self.hidden)
        if rule is None or kind not in ("weight", "bias"):
            raise RuntimeError(f"prune_model: no slicing rule for pruned-model parameter {name!r}")
        out_kind = self.out_bias_kinds.get(rest) if m and kind == "bias" else None
        plan = self.plan
        if out_kind is not None and plan.output_bias and plan.output_bias.get(out_kind):
            return TensorRecipe(name, src_name, source_layer=src_layer, output_bias=out_kind)
        cols = None if kind == "bias" else (sets[rule[1]] if rule[1] else None)
        return TensorRecipe(name, src_name, rows=sets[rule[0]] if rule[0] else None, cols=cols, source_layer=src_layer)

    def make(self, recipe: TensorRecipe, src: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The pruned tensor from its source tensor `src` (None: the source lacks it, allowed only for an
        added output bias); `dtype` is the pruned model's (used for added output biases)."""
        if recipe.output_bias is not None:
            return _output_bias(self.plan, src, recipe.source_layer, recipe.output_bias, self.hidden, dtype)
        if src is None:
            raise RuntimeError(f"prune_model: {recipe.name!r} maps to {recipe.source!r}, which the source model lacks")
        if src.dim() == 1:
            return slice_norm(src, recipe.rows) if recipe.rows is not None else src.clone()
        out, _ = slice_linear(src, None, recipe.rows, recipe.cols)
        return out

    def belongs_to_removed(self, source_name: str) -> bool:
        """True for a source parameter of a removed layer or sublayer (it has no counterpart)."""
        return _belongs_to_removed(source_name, self.plan, self.layer_re, self.spec)


@torch.no_grad()
def prune_model(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Return a new model with only what `plan` keeps. `model` is not modified: its tensors are only
    read, and the result shares no storage with it. dtype, device, attention implementation, train/eval
    mode and generation config are carried over."""
    _check_plan_matches(model, plan)
    spec = arch_spec(model.config)
    first = next(model.parameters())
    dtype, device = first.dtype, first.device

    config = plan.pruned_config()
    cls = _model_class(config)
    attn_impl = getattr(model.config, "_attn_implementation", None)
    from transformers.initialization import no_init_weights

    slicer = PlanSlicer(plan, spec, device)
    # No random init: every parameter is overwritten below (and checked to be), so init is wasted time.
    with torch.device(device), no_init_weights():
        new = cls._from_config(config, dtype=dtype, attn_implementation=attn_impl)
    new.tie_weights()  # skipped with init above; ties lm_head to the embedding when the config says so

    kept = slicer.kept
    src_params = dict(model.named_parameters())
    src_buffers = dict(model.named_buffers())
    prefix, layer_re = slicer.prefix, slicer.layer_re

    used: set[str] = set()
    filled: set[str] = set()
    for name, param in new.named_parameters():  # unique parameters: a tied lm_head appears once
        recipe = slicer.recipe(name)
        out = slicer.make(recipe, src_params.get(recipe.source), dtype)
        if out.shape != param.shape:
            raise RuntimeError(
                f"prune_model: {recipe.source} sliced to {tuple(out.shape)} but the pruned config gives {name} "
                f"shape {tuple(param.shape)}"
            )
        if name in filled:
            raise RuntimeError(f"prune_model: {name!r} filled twice")
        param.copy_(out)
        filled.add(name)
        if recipe.source in src_params:
            used.add(recipe.source)

    leftover = [n for n in src_params if n not in used and not slicer.belongs_to_removed(n)]
    if leftover:
        raise RuntimeError(f"prune_model: source parameters with no counterpart in the pruned model: {leftover}")

    # Buffers (rotary inv_freq) are config-derived; copying the source's keeps them bit-identical.
    for name, buf in new.named_buffers():
        m = layer_re.match(name.rpartition(".")[0])
        src_name = f"{prefix}{kept[int(m.group(1))]}.{m.group(2)}.{name.rpartition('.')[2]}" if m else name
        src = src_buffers.get(src_name)
        if src is not None and src.shape == buf.shape:
            buf.copy_(src)

    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    setattr(new, PLAN_ATTRIBUTE, plan)
    return new


def convert(model: nn.Module, plan: PrunePlan | str | os.PathLike) -> nn.Module:
    """The smaller model that `plan` (a `PrunePlan` or a dms_plan.json path) describes, built by
    `prune_model`; `model` is not modified. The result carries its plan (`plan_of`), so
    `save_pruned(pruned, tokenizer, folder)` needs nothing else."""
    if isinstance(plan, (str, os.PathLike)):
        plan = PrunePlan.from_json(os.fspath(plan))
    if not isinstance(plan, PrunePlan):
        raise TypeError(f"plan must be a PrunePlan or the path of a dms_plan.json, got {type(plan).__name__}")
    return prune_model(model, plan)


def plan_of(model: nn.Module) -> PrunePlan:
    """The plan a model from `convert` / `prune_model` was pruned with."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise ValueError(f"this {type(model).__name__} carries no plan: prune it with dms_llm.convert(model, plan), "
                         "or pass the plan")
    return plan


def pruned_tensor_reader(model: nn.Module, plan: PrunePlan):
    """`read(name)`: the pruned model's parameter `name`, sliced from `model` by `plan` when it is asked
    for, by the same rules as `prune_model` (for `streamed.streamed`: the plan checked without a pruned
    copy in memory)."""
    _check_plan_matches(model, plan)
    first = next(model.parameters())
    slicer = PlanSlicer(plan, arch_spec(model.config), first.device)
    src_params = dict(model.named_parameters())

    @torch.no_grad()
    def read(name: str) -> torch.Tensor:
        recipe = slicer.recipe(name)
        return slicer.make(recipe, src_params.get(recipe.source), first.dtype)

    return read


def _output_bias(plan: PrunePlan, src_bias, layer: int, kind: str, hidden: torch.Tensor, dtype) -> torch.Tensor:
    """The source's output bias (zero when it has none) plus the plan's delta, on the kept hidden rows.
    Summed in float32 so a bf16 model loses nothing more than the final rounding."""
    total = src_bias.detach().float().clone() if src_bias is not None else torch.zeros(plan.shapes.hidden_size, device=hidden.device)
    delta = (plan.output_bias_values or {}).get(f"{layer}.{kind}")
    if delta is not None:
        total = total + delta.to(device=total.device, dtype=torch.float32)
    return total.index_select(0, hidden.to(total.device)).to(dtype)


def _belongs_to_removed(name: str, plan: PrunePlan, layer_re, spec) -> bool:
    m = layer_re.match(name.rpartition(".")[0])
    if not m:
        return False
    lp, rest = plan.layers[int(m.group(1))], m.group(2)
    if lp.removed:
        return True
    if not lp.has_attention and (rest.startswith(f"{spec.attn}.") or rest == spec.attn_norm):
        return True
    return not lp.has_mlp and (rest.startswith(f"{spec.mlp}.") or rest == spec.mlp_norm)
