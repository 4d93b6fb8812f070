"""`PrunePlan`: the kept indices of every searchable structure, its JSON form, and the pruned config.

The plan is the single hand-off between the search and the pruned model: `prune.prune_model` slices the
weights it names, and `PrunePlan.pruned_config()` derives the smaller model's config from it (never by
patching a config afterwards). `layers` has one entry per *source* layer; a layer whose
`attention_groups` and `mlp_channels` are both empty is removed and the rest are renumbered 0..L'-1.

    plan = PrunePlan.dense(model.config, source_model="HuggingFaceTB/SmolLM2-135M")
    plan.to_json("dms_plan.json"); plan = PrunePlan.from_json("dms_plan.json")
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .arch import FAMILIES, bias_facts, model_shapes
from .budget import ParameterCounter
from .files import write_atomic, write_text_atomic
from .provenance import PlanRecord

PLAN_FORMAT = "dms_plan/1"
# Output-bias deltas (e.g. FLAP's bias compensation) live beside the plan JSON: `dms_plan.json` ->
# `dms_plan.bias.safetensors`; the JSON names the file, so a renamed plan still finds its values.
BIAS_SUFFIX = ".bias.safetensors"
OUTPUT_BIAS_KINDS = ("attention", "mlp")

# Config keys that describe the source checkpoint rather than the architecture, or that the derived
# config sets itself; carrying them over would make the pruned config lie.
_DROPPED_KEYS = ("transformers_version", "_name_or_path", "auto_map", "architectures", "model_type")
_DMS_LIST_KEYS = ("layer_num_key_value_heads", "layer_num_attention_heads", "layer_intermediate_sizes")


class PlanError(ValueError):
    """A plan that does not fit its source config (or is malformed)."""


@dataclass
class LayerPlan:
    """Kept KV groups and MLP channels of one source layer (both empty: the layer is removed)."""

    attention_groups: list[int] = field(default_factory=list)
    mlp_channels: list[int] = field(default_factory=list)

    @property
    def has_attention(self) -> bool:
        return len(self.attention_groups) > 0

    @property
    def has_mlp(self) -> bool:
        return len(self.mlp_channels) > 0

    @property
    def removed(self) -> bool:
        return not (self.has_attention or self.has_mlp)


def _check_indices(what: str, idx: Any, n: int, allow_empty: bool = True) -> list[int]:
    if hasattr(idx, "tolist"):  # tensors / arrays straight from the hard masks
        idx = idx.tolist()
    if not isinstance(idx, (list, tuple)) or any(isinstance(i, bool) or not hasattr(i, "__index__") for i in idx):
        raise PlanError(f"{what}: expected a list of integers, got {type(idx).__name__} {str(idx)[:60]}")
    idx = [operator.index(i) for i in idx]
    if not idx and not allow_empty:
        raise PlanError(f"{what}: must keep at least one element")
    for a, b in zip(idx, idx[1:]):
        if b == a:
            raise PlanError(f"{what}: index {a} appears twice (indices must be unique)")
        if b < a:
            raise PlanError(f"{what}: indices must be sorted ascending ({a} comes before {b})")
    if idx and (idx[0] < 0 or idx[-1] >= n):
        bad = idx[0] if idx[0] < 0 else idx[-1]
        raise PlanError(f"{what}: index {bad} out of range [0, {n})")
    return idx


@dataclass
class PrunePlan:
    """Kept indices per structure of one source model. See docs/DESIGN.md for the JSON format."""

    source_model: str
    source_model_type: str
    source_config: dict
    hidden_channels: list[int]
    layers: list[LayerPlan]
    params_before: int | None = None
    params_after: int | None = None
    # How the plan was made (`PlanRecord`); a dict given here or assigned later becomes one.
    metadata: PlanRecord = field(default_factory=PlanRecord)
    # Output biases the pruned model gains on o_proj ("attention") / down_proj ("mlp") of every present
    # sublayer, e.g. {"attention": True, "mlp": True}; None = none added (the JSON then omits the key).
    output_bias: dict | None = None
    # Per source layer, what is *added* to that output (source bias, or zero when the source has none),
    # keyed "{layer}.attention" / "{layer}.mlp", each a [source hidden_size] tensor; a missing key adds zero.
    output_bias_values: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.layers = [LayerPlan(**lp) if isinstance(lp, dict) else lp for lp in self.layers]
        self.validate()

    # ----- validation --------------------------------------------------------------------------
    @property
    def shapes(self):
        """Dense sizes of the source (per layer, so a dms_llama source can be pruned again)."""
        return model_shapes(SimpleNamespace(**self.source_config))

    def validate(self) -> None:
        if not isinstance(self.source_config, dict):
            raise PlanError("source_config must be the source config as a dict (config.to_dict())")
        cfg_type = self.source_config.get("model_type")
        if cfg_type != self.source_model_type:
            raise PlanError(
                f"source_model_type {self.source_model_type!r} differs from source_config model_type {cfg_type!r}"
            )
        if self.source_model_type not in FAMILIES:
            raise PlanError(f"unsupported source_model_type {self.source_model_type!r}; supported: {sorted(FAMILIES)}")
        try:
            s = self.shapes
        except (AttributeError, TypeError) as e:
            raise PlanError(f"source_config lacks a size field: {e}") from e
        self.hidden_channels = _check_indices("hidden_channels", self.hidden_channels, s.hidden_size, False)
        if len(self.layers) != s.num_layers:
            raise PlanError(
                f"layers: {len(self.layers)} entries, but the source has {s.num_layers} layers (one entry per source layer)"
            )
        for i, lp in enumerate(self.layers):
            if not isinstance(lp, LayerPlan):
                raise PlanError(f"layers[{i}]: expected an object with attention_groups and mlp_channels")
            lp.attention_groups = _check_indices(f"layers[{i}].attention_groups", lp.attention_groups, s.num_kv_heads[i])
            lp.mlp_channels = _check_indices(f"layers[{i}].mlp_channels", lp.mlp_channels, s.intermediate[i])
        if all(lp.removed for lp in self.layers):
            raise PlanError("the plan removes every layer; at least one attention or MLP sublayer must remain")
        self._validate_output_bias(s)

    def _validate_output_bias(self, s) -> None:
        ob = self.output_bias
        if ob is None:
            if self.output_bias_values:
                raise PlanError("output_bias_values given but output_bias is not set")
            return
        if not isinstance(ob, dict) or set(ob) - set(OUTPUT_BIAS_KINDS) - {"values"}:
            raise PlanError(f"output_bias must map {'/'.join(OUTPUT_BIAS_KINDS)} to true/false, got {ob!r}")
        self.output_bias = {k: bool(ob.get(k, False)) for k in OUTPUT_BIAS_KINDS}
        for key, value in (self.output_bias_values or {}).items():
            layer, _, kind = str(key).partition(".")
            if not layer.isdigit() or int(layer) >= s.num_layers or kind not in OUTPUT_BIAS_KINDS:
                raise PlanError(f"output_bias_values: bad key {key!r} (expected '<source layer>.attention|mlp')")
            if not self.output_bias[kind]:
                raise PlanError(f"output_bias_values has {key!r} but output_bias[{kind!r}] is false")
            if tuple(getattr(value, "shape", ())) != (s.hidden_size,):
                raise PlanError(f"output_bias_values[{key!r}] must have shape ({s.hidden_size},), got {getattr(value, 'shape', None)}")

    def adds_output_bias(self, kind: str) -> bool:
        """True when the pruned model has an output bias of `kind` that the source family lacks."""
        facts = bias_facts(self.source_config)
        src = facts.o if kind == "attention" else facts.down
        return bool(self.output_bias and self.output_bias.get(kind)) and not src

    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def dense(cls, config, source_model: str | None = None) -> "PrunePlan":
        """The plan that keeps everything (the identity; its pruned model equals the source)."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        d = json.loads(json.dumps(d, default=str))  # plain JSON types, as from_json would give
        s = model_shapes(SimpleNamespace(**d))
        plan = cls(
            source_model=source_model if source_model is not None else str(d.get("_name_or_path") or ""),
            source_model_type=d["model_type"],
            source_config=d,
            hidden_channels=list(range(s.hidden_size)),
            layers=[LayerPlan(list(range(s.num_kv_heads[i])), list(range(s.intermediate[i]))) for i in range(s.num_layers)],
        )
        plan.params_before = plan.params_after = count_plan_parameters(plan)
        return plan

    # ----- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "format": PLAN_FORMAT,
            "source_model": self.source_model,
            "source_model_type": self.source_model_type,
            "source_config": self.source_config,
            "hidden_channels": list(self.hidden_channels),
            "layers": [{"attention_groups": lp.attention_groups, "mlp_channels": lp.mlp_channels} for lp in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "metadata": self.metadata.to_dict(),
        }
        if self.output_bias is not None:  # absent otherwise: plans without biases stay byte-identical
            d["output_bias"] = dict(self.output_bias)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        if not isinstance(d, dict):
            raise PlanError(f"a plan is a JSON object, got {type(d).__name__}")
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"unknown plan format {fmt!r}; this version reads {PLAN_FORMAT!r}")
        required = ("source_model", "source_model_type", "source_config", "hidden_channels", "layers")
        missing = [k for k in required if k not in d]
        if missing:
            raise PlanError(f"plan is missing {', '.join(missing)}")
        unknown = sorted(set(d) - set(required) - {"format", "params_before", "params_after", "metadata", "output_bias"})
        if unknown:
            raise PlanError(f"plan has unknown keys {unknown}")
        layers = []
        for i, lp in enumerate(d["layers"]):
            if not isinstance(lp, dict) or set(lp) != {"attention_groups", "mlp_channels"}:
                raise PlanError(f"layers[{i}] must have exactly the keys attention_groups and mlp_channels")
            layers.append(LayerPlan(**lp))
        return cls(
            source_model=d["source_model"],
            source_model_type=d["source_model_type"],
            source_config=d["source_config"],
            hidden_channels=d["hidden_channels"],
            layers=layers,
            params_before=d.get("params_before"),
            params_after=d.get("params_after"),
            metadata=PlanRecord.from_dict(d.get("metadata")),
            output_bias=d.get("output_bias"),
        )

    def to_json(self, path: str) -> None:
        """Write the plan; one line per layer keeps multi-megabyte index lists diffable and readable."""
        d = self.to_dict()
        if self.output_bias_values:
            d["output_bias"]["values"] = os.path.basename(_bias_path(path))
            _save_bias_values(self.output_bias_values, _bias_path(path))
        dump = lambda v: json.dumps(v, default=str)  # noqa: E731
        body = [f'  "{k}": {dump(v)}' for k, v in d.items() if k != "layers"]
        layers = ",\n".join(f"    {dump(lp)}" for lp in d["layers"])
        body.insert(5, f'  "layers": [\n{layers}\n  ]')
        text = "{\n" + ",\n".join(body) + "\n}\n"
        write_text_atomic(path, text)

    @classmethod
    def from_json(cls, path: str) -> "PrunePlan":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from e
        values_file = (d.get("output_bias") or {}).get("values") if isinstance(d, dict) else None
        try:
            plan = cls.from_dict(d)
            if values_file:
                bias_path = os.path.join(os.path.dirname(os.path.abspath(path)), values_file)
                if not os.path.isfile(bias_path):
                    raise PlanError(f"its output-bias values {values_file} are missing (they belong beside the plan)")
                plan.output_bias_values = _load_bias_values(bias_path)
                plan.validate()
            return plan
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e

    # ----- derived facts -----------------------------------------------------------------------
    def kept_layers(self) -> list[int]:
        """Source indices of the layers that survive, in order (pruned layer j = source kept_layers()[j])."""
        return [i for i, lp in enumerate(self.layers) if not lp.removed]

    def is_uniform(self) -> bool:
        """True when a stock config of the source family can describe the pruned model: every surviving
        layer keeps both sublayers with the same numbers of KV groups, query heads and MLP channels."""
        s = self.shapes
        kept = self.kept_layers()
        if any(not (self.layers[i].has_attention and self.layers[i].has_mlp) for i in kept):
            return False
        sizes = {(len(self.layers[i].attention_groups), s.n_rep(i), len(self.layers[i].mlp_channels)) for i in kept}
        return len(sizes) == 1

    def uses_stock_format(self) -> bool:
        """Uniform, a stock family, and accepted by that family's config class (LlamaConfig, for
        instance, refuses a hidden size that is not a multiple of the number of heads)."""
        if not self.is_uniform() or not FAMILIES[self.source_model_type].stock:
            return False
        if self.adds_output_bias("attention") or self.adds_output_bias("mlp"):
            # Stock configs tie the o_proj / down_proj bias to q/k/v / gate/up biases (or have none).
            return False
        from huggingface_hub.errors import StrictDataclassClassValidationError

        try:
            self._stock_config()
        except (StrictDataclassClassValidationError, ValueError):  # the family's config validator refused the sizes
            return False
        return True

    def pruned_config(self):
        """The config of the pruned model, derived from the plan alone: a stock config of the source
        `model_type` when `uses_stock_format()`, else a per-layer `DMSLlamaConfig`."""
        return self._stock_config() if self.uses_stock_format() else self._dms_config()

    def _base_dict(self) -> dict:
        """Source config keys that survive pruning unchanged (rope, norms, vocab, token ids, ...)."""
        kept = self.kept_layers()
        d = {k: v for k, v in self.source_config.items() if k not in _DROPPED_KEYS and k not in _DMS_LIST_KEYS}
        d["hidden_size"] = len(self.hidden_channels)
        d["num_hidden_layers"] = len(kept)
        d["head_dim"] = self.shapes.head_dim
        # Per-layer attention types (sliding windows) follow their layers, so the kept layers keep theirs.
        if isinstance(d.get("layer_types"), list):
            d["layer_types"] = [self.source_config["layer_types"][i] for i in kept]
        if isinstance(d.get("max_window_layers"), int):
            d["max_window_layers"] = sum(1 for i in kept if i < self.source_config["max_window_layers"])
        return d

    def _stock_config(self):
        from transformers import CONFIG_MAPPING

        s = self.shapes
        kept = self.kept_layers()
        first = self.layers[kept[0]]
        d = self._base_dict()
        d["num_key_value_heads"] = len(first.attention_groups)
        d["num_attention_heads"] = len(first.attention_groups) * s.n_rep(kept[0])
        d["intermediate_size"] = len(first.mlp_channels)
        return CONFIG_MAPPING[self.source_model_type].from_dict(d)

    def _dms_config(self):
        from .modeling import DMSLlamaConfig

        s = self.shapes
        kept = self.kept_layers()
        kv = [len(self.layers[i].attention_groups) for i in kept]
        heads = [len(self.layers[i].attention_groups) * s.n_rep(i) for i in kept]
        inter = [len(self.layers[i].mlp_channels) for i in kept]
        bias = bias_facts(self.source_config)
        d = self._base_dict()
        # Family-specific switches that the per-layer lists and explicit flags below replace.
        for k in ("use_sliding_window", "max_window_layers", "pretraining_tp"):
            d.pop(k, None)
        # dms_llama applies `sliding_window` to every attention layer (its layer_types are derived), so
        # the window survives only when every kept layer used it; a mix cannot be expressed.
        types = d.pop("layer_types", None)
        if isinstance(types, list) and d.get("sliding_window") is not None:
            used = {t for t, i in zip(types, kept) if self.layers[i].has_attention}
            if used == {"full_attention"} or not used:
                d["sliding_window"] = None
            elif used != {"sliding_attention"}:
                raise PlanError(
                    f"the kept layers mix attention types {sorted(used)}; the per-layer dms_llama format applies "
                    "one sliding window to all layers and cannot express this plan"
                )
        d.update(
            layer_num_key_value_heads=kv,
            layer_num_attention_heads=heads,
            layer_intermediate_sizes=inter,
            # Scalar fields stay meaningful for code that reads them: the largest layer.
            num_key_value_heads=max(kv) or 1,
            num_attention_heads=max(heads) or 1,
            intermediate_size=max(inter) or 1,
            attention_bias=bias.qkv,
            attention_out_bias=bias.o or self.adds_output_bias("attention"),
            mlp_bias=bias.gate_up,
            mlp_out_bias=bias.down or self.adds_output_bias("mlp"),
        )
        return DMSLlamaConfig(**d)

    # ----- reporting ---------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """One row per source layer, for the model card and logs."""
        s = self.shapes
        rows, j = [], 0
        for i, lp in enumerate(self.layers):
            g, c = len(lp.attention_groups), len(lp.mlp_channels)
            parts = [name for name, present in (("attention", lp.has_attention), ("mlp", lp.has_mlp)) if present]
            rows.append(
                dict(
                    source_layer=i,
                    layer=None if lp.removed else j,
                    kv_groups=g,
                    kv_groups_before=s.num_kv_heads[i],
                    heads=g * s.n_rep(i),
                    heads_before=s.num_heads[i],
                    mlp_channels=c,
                    mlp_channels_before=s.intermediate[i],
                    sublayers="+".join(parts) if parts else "removed",
                )
            )
            j += 0 if lp.removed else 1
        return rows


def _record_of(plan: PrunePlan) -> PlanRecord:
    return plan.__dict__["metadata"]


def _set_record(plan: PrunePlan, value) -> None:
    # A plan's record is always typed, however it is given: older code and notebooks assign plain dicts. It is
    # kept under its own name in the instance dict, so `PrunePlan(**plan.__dict__)` still copies a plan.
    plan.__dict__["metadata"] = value if isinstance(value, PlanRecord) else PlanRecord.from_dict(value)


PrunePlan.metadata = property(_record_of, _set_record, doc="How the plan was made: a `PlanRecord`.")


def count_plan_parameters(plan: PrunePlan) -> int:
    """Parameters of the model the plan produces, from shapes alone (no model needed), by the one formula
    of `budget.py`; tests compare it with `sum(p.numel())` of the pruned model."""
    added = {kind: plan.adds_output_bias(kind) for kind in OUTPUT_BIAS_KINDS}
    counter = ParameterCounter(plan.source_config, output_bias=added)
    present = [(len(lp.attention_groups), len(lp.mlp_channels)) for lp in plan.layers]
    return counter.sizes([g for g, _ in present], [c for _, c in present], hidden=len(plan.hidden_channels))


def _bias_path(plan_path: str) -> str:
    base = plan_path[:-5] if plan_path.endswith(".json") else plan_path
    return base + BIAS_SUFFIX


def _save_bias_values(values: dict, path: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in values.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp))


def _load_bias_values(path: str) -> dict:
    from safetensors.torch import load_file

    return dict(load_file(path))
