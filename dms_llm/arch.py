"""Per-family facts: where each piece of a Llama-style decoder lives and which projections carry a
bias, keyed by `config.model_type`.

Adding a family whose modules follow the Llama layout is one `register_family(...)` call; a family with
other names needs its own `ArchSpec`, one with other bias conventions its own bias rule. Nothing else in
dms_llm branches on the model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths of a decoder-only model with pre-norm attention + gated MLP blocks."""

    decoder: str = "model"  # the base model inside *ForCausalLM
    layers: str = "layers"
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"


    def projections(self) -> tuple[str, ...]:
        """The seven projection names of a decoder layer (q, k, v, o, gate, up, down)."""
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


@dataclass(frozen=True)
class BiasFacts:
    """Which projections carry a bias: q/k/v, o_proj, gate/up, down_proj."""

    qkv: bool
    o: bool
    gate_up: bool
    down: bool


def _llama_biases(cfg: dict) -> BiasFacts:  # Llama's attention_bias covers q/k/v *and* o
    attn, mlp = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    return BiasFacts(attn, attn, mlp, mlp)


def _dms_llama_biases(cfg: dict) -> BiasFacts:  # explicit flags per projection group
    attn, mlp = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    return BiasFacts(attn, bool(cfg.get("attention_out_bias", attn)), mlp, bool(cfg.get("mlp_out_bias", mlp)))


LLAMA_LAYOUT = ArchSpec()


@dataclass(frozen=True)
class Family:
    spec: ArchSpec
    biases: Callable[[dict], BiasFacts]
    stock: bool  # its own config class can describe a uniformly pruned model (a stock checkpoint)


FAMILIES: dict[str, Family] = {}


def register_family(model_type: str, spec: ArchSpec = LLAMA_LAYOUT, biases: Callable[[dict], BiasFacts] = _llama_biases,
                    stock: bool = True) -> None:
    FAMILIES[model_type] = Family(spec, biases, stock)


# Mistral and Qwen2 use Llama's module names; Mistral has no biases, Qwen2 q/k/v biases only.
# dms_llama is our own per-layer architecture, so a pruned checkpoint can be searched again.
register_family("llama")
register_family("mistral", biases=lambda cfg: BiasFacts(False, False, False, False))
register_family("qwen2", biases=lambda cfg: BiasFacts(True, False, False, False))
register_family("dms_llama", biases=_dms_llama_biases, stock=False)


class UnsupportedArchitectureError(ValueError):
    pass


def _family(config) -> Family:
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        architectures = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
        raise UnsupportedArchitectureError(
            f"dms_llm does not support model_type {model_type!r} (architectures {architectures}). "
            f"Supported model types: {supported}. Llama-style checkpoints (e.g. SmolLM2) declare model_type 'llama'."
        )
    return FAMILIES[model_type]


def arch_spec(config) -> ArchSpec:
    return _family(config).spec


def bias_facts(config) -> BiasFacts:
    """Which projections carry a bias, from the config (a config object or its dict) alone."""
    return _family(config).biases(config if isinstance(config, dict) else config.to_dict())


@dataclass(frozen=True)
class Shapes:
    """The dense sizes the searchable structures are defined over."""

    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: tuple[int, ...]  # query heads per layer
    num_kv_heads: tuple[int, ...]  # KV groups per layer (0: no attention)
    intermediate: tuple[int, ...]  # MLP channels per layer (0: no MLP)
    vocab_size: int
    tie_word_embeddings: bool

    def n_rep(self, layer: int) -> int:
        return self.num_heads[layer] // self.num_kv_heads[layer] if self.num_kv_heads[layer] else 0


def model_shapes(config) -> Shapes:
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "layer_num_attention_heads", None) or [config.num_attention_heads] * n
    kv_default = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv = getattr(config, "layer_num_key_value_heads", None) or [kv_default] * n
    inter = getattr(config, "layer_intermediate_sizes", None) or [config.intermediate_size] * n
    return Shapes(
        num_layers=n,
        hidden_size=config.hidden_size,
        head_dim=head_dim,
        num_heads=tuple(heads),
        num_kv_heads=tuple(kv),
        intermediate=tuple(inter),
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """Resolve a dotted attribute path; None when any step is missing (e.g. a removed sublayer)."""
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class ModelParts:
    """Resolved module handles of one model, so hooks and counting never repeat the path logic."""

    def __init__(self, model: nn.Module):
        self.spec = arch_spec(model.config)
        self.shapes = model_shapes(model.config)
        spec = self.spec
        decoder = getattr(model, spec.decoder, None)
        self.embed = get_submodule(decoder, spec.embed) if decoder is not None else None
        self.final_norm = get_submodule(decoder, spec.final_norm) if decoder is not None else None
        layers = get_submodule(decoder, spec.layers) if decoder is not None else None
        if self.embed is None or self.final_norm is None or layers is None:
            raise UnsupportedArchitectureError(
                f"could not find {spec.decoder}.{spec.embed}, {spec.decoder}.{spec.final_norm} and "
                f"{spec.decoder}.{spec.layers} in {type(model).__name__}; pass a *ForCausalLM model"
            )
        self.layers = list(layers)
        self.lm_head = get_submodule(model, spec.lm_head)

    def attn(self, layer: int) -> nn.Module | None:
        return get_submodule(self.layers[layer], self.spec.attn)

    def mlp(self, layer: int) -> nn.Module | None:
        return get_submodule(self.layers[layer], self.spec.mlp)

    def attn_proj(self, layer: int, which: str) -> nn.Linear | None:
        return get_submodule(self.layers[layer], f"{self.spec.attn}.{getattr(self.spec, which)}")

    def mlp_proj(self, layer: int, which: str) -> nn.Linear | None:
        return get_submodule(self.layers[layer], f"{self.spec.mlp}.{getattr(self.spec, which)}")

    def norm(self, layer: int, which: str) -> nn.Module | None:
        return get_submodule(self.layers[layer], getattr(self.spec, which))

    def projection_names(self) -> list[str]:
        """The projection names present in the decoder layers, in q, k, v, o, gate, up, down order (the
        LoRA targets); a dms_llama model may lack some in some layers, or everywhere."""
        found = {name.rsplit(".", 1)[-1] for layer in self.layers for name, m in layer.named_modules()
                 if isinstance(m, nn.Linear)}
        return [p for p in self.spec.projections() if p in found]

    def norms(self) -> list[nn.Module]:
        found = [self.norm(i, w) for i in range(len(self.layers)) for w in ("attn_norm", "mlp_norm")]
        return [n for n in found if n is not None] + [self.final_norm]
