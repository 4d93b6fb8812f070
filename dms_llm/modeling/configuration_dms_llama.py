"""Configuration of the per-layer Llama architecture (`model_type = "dms_llama"`).

This file is copied into every saved checkpoint (remote code), so it imports only transformers and
huggingface_hub, never dms_llm.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


@strict
class DMSLlamaConfig(LlamaConfig):
    r"""A `LlamaConfig` whose layers may differ in shape.

    Per-layer lists are indexed by this model's layer index and have `num_hidden_layers` entries:

    - `layer_num_attention_heads`: query heads of each layer (`= layer_num_key_value_heads[i] * n_rep`).
    - `layer_num_key_value_heads`: KV heads of each layer; 0 means the layer has no attention sublayer
      (no `self_attn`, no `input_layernorm`).
    - `layer_intermediate_sizes`: MLP channels of each layer; 0 means the layer has no MLP sublayer
      (no `mlp`, no `post_attention_layernorm`).

    When a list is None it is uniform, taken from the scalar field (`num_attention_heads`,
    `num_key_value_heads`, `intermediate_size`). After construction the scalars hold the maximum over
    layers: they are only what generic transformers utilities read, the lists are the truth.

    `head_dim` is explicit (heads are pruned, not their width). Biases are split per projection
    group: `attention_bias` (q/k/v), `attention_out_bias` (o_proj), `mlp_bias` (gate/up),
    `mlp_out_bias` (down_proj); the `*_out_bias` fields default to their input counterpart, which is
    stock Llama's behaviour (Qwen2 is `attention_bias=True, attention_out_bias=False`).

    `sliding_window` (Mistral), when set, applies to every attention layer.
    """

    model_type = "dms_llama"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    attention_out_bias: bool | None = None
    mlp_out_bias: bool | None = None
    sliding_window: int | None = None

    def __post_init__(self, **kwargs):
        # A source config's dict (`DMSLlamaConfig(**qwen2_config.to_dict(), ...)`) carries its own
        # `model_type` and `layer_types`; set as instance attributes they would shadow ours (the class
        # attribute and the derived, read-only property).
        kwargs.pop("model_type", None)
        kwargs.pop("layer_types", None)
        n = self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        self.layer_num_attention_heads = [int(x) for x in self.layer_num_attention_heads]
        self.layer_num_key_value_heads = [int(x) for x in self.layer_num_key_value_heads]
        self.layer_intermediate_sizes = [int(x) for x in self.layer_intermediate_sizes]
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.mlp_out_bias is None:
            self.mlp_out_bias = self.mlp_bias
        self._check_layers()
        # Rope, DynamicCache sizing and third-party tools read the scalars; the largest layer is the
        # safe answer. A model with no attention (or no MLP) anywhere keeps the given scalar so that
        # nothing divides by zero.
        self.num_attention_heads = max(self.layer_num_attention_heads, default=0) or self.num_attention_heads
        self.num_key_value_heads = max(self.layer_num_key_value_heads, default=0) or self.num_key_value_heads
        self.intermediate_size = max(self.layer_intermediate_sizes, default=0) or self.intermediate_size
        if not any(self.layer_num_key_value_heads):
            # Without attention there is nothing to cache, and transformers' caches cannot report a
            # length; `generate` reads this default and decodes with full forwards instead.
            self.use_cache = False
        super().__post_init__(**kwargs)

    def _check_layers(self):
        n = self.num_hidden_layers
        lists = {
            "layer_num_attention_heads": self.layer_num_attention_heads,
            "layer_num_key_value_heads": self.layer_num_key_value_heads,
            "layer_intermediate_sizes": self.layer_intermediate_sizes,
        }
        for name, values in lists.items():
            if len(values) != n:
                raise ValueError(f"`{name}` has {len(values)} entries but num_hidden_layers is {n}: {values}")
            if any(v < 0 for v in values):
                raise ValueError(f"`{name}` must be non-negative, got {values}")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be a positive even integer (rotary halves), got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"`sliding_window` must be positive or None, got {self.sliding_window}")
        for i, (heads, kv, inter) in enumerate(
            zip(self.layer_num_attention_heads, self.layer_num_key_value_heads, self.layer_intermediate_sizes)
        ):
            if (heads == 0) != (kv == 0):
                raise ValueError(
                    f"layer {i}: {heads} query heads with {kv} KV heads; a layer either has both or neither"
                )
            if kv and heads % kv:
                raise ValueError(
                    f"layer {i}: {heads} query heads is not a multiple of its {kv} KV heads (heads = kv * n_rep)"
                )
            if heads == 0 and inter == 0:
                raise ValueError(
                    f"layer {i} has neither attention nor MLP; it is an identity and must be removed from the "
                    "config (lower num_hidden_layers) instead"
                )

    def validate_architecture(self):
        """Part of `@strict` validation. Replaces Llama's `hidden_size % num_attention_heads` check,
        which a pruned hidden size with an explicit `head_dim` legitimately fails."""
        self._check_layers()

    @property
    def layer_types(self) -> list[str] | None:
        """The types of the KV-cache slots, read by transformers' caches and mask helpers; derived, never
        serialised. Attention layers take the first slots in order (`attention_cache_slot`) and the
        remaining slots are "moe", the attention-free type the caches know (a `DummyLayer` that stores
        nothing). Slot 0 thus caches whenever any layer has attention, which is where `generate` reads
        the cached length; transformers 5.25 no longer looks past an attention-free slot 0."""
        kv = self.__dict__.get("layer_num_key_value_heads")
        if kv is None:
            return None
        attention = "full_attention" if self.__dict__.get("sliding_window") is None else "sliding_attention"
        with_attention = sum(1 for k in kv if k)
        return [attention] * with_attention + ["moe"] * (len(kv) - with_attention)

    @property
    def attention_layer_indices(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_num_key_value_heads) if k]

    def attention_cache_slot(self, layer_idx: int) -> int:
        """The KV-cache slot of decoder layer `layer_idx`, which must have attention: its rank among the
        attention layers."""
        return self.attention_layer_indices.index(layer_idx)


__all__ = ["DMSLlamaConfig"]
