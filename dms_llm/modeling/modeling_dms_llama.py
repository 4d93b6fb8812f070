"""Per-layer Llama (`model_type = "dms_llama"`): every decoder layer reads its own heads, KV heads and
MLP width from `DMSLlamaConfig`, and may lack its attention or its MLP sublayer entirely.

Parameter names are exactly Llama's, so weights sliced from a stock Llama/Mistral/Qwen2 copy over 1:1.
This file is copied into every saved checkpoint (remote code): it imports only torch and
transformers, and its config through a relative import.
"""

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple

from .configuration_dms_llama import DMSLlamaConfig

# This file is loaded by whatever transformers a checkpoint's user has, so it leans on as few internal
# helpers as it can and adapts to the one rename seen so far: transformers 5.24 calls the KV cache `cache`
# (forward keyword, mask helpers, output field) where earlier 5.x releases said `past_key_values`.
# Forwards accept both names; every helper gets the name its own signature declares.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_keyword(names) -> str:
    for name in _CACHE_NAMES:
        if name in names:
            return name
    raise ImportError(f"this transformers release names the KV cache none of {_CACHE_NAMES}; dms_llama cannot use it")


_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
_MASK_CACHE_KEYWORD = _cache_keyword(_MASK_PARAMETERS)
if "layer_idx" not in _MASK_PARAMETERS:
    raise ImportError("dms_llama needs transformers >= 5.20 (create_causal_mask(layer_idx=...)); upgrade transformers")


_OUTPUT_CACHE_FIELD = _cache_keyword({f.name for f in dataclasses.fields(BaseModelOutputWithPast)})


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class DMSLlamaAttention(nn.Module):
    def __init__(self, config: DMSLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        # What attention functions and `cache.update` call the layer index is the KV-cache slot, which
        # skips attention-free layers (`config.layer_types` describes the slots).
        self.layer_idx = config.attention_cache_slot(layer_idx)
        self.head_dim = config.head_dim
        self.num_heads = config.layer_num_attention_heads[layer_idx]
        self.num_key_value_heads = config.layer_num_key_value_heads[layer_idx]
        # Read by the eager/sdpa/flash attention functions to expand KV heads.
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=config.attention_out_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DMSLlamaMLP(nn.Module):
    def __init__(self, config: DMSLlamaConfig, layer_idx: int):
        super().__init__()
        hidden, inter = config.hidden_size, config.layer_intermediate_sizes[layer_idx]
        self.gate_proj = nn.Linear(hidden, inter, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=config.mlp_out_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DMSLlamaDecoderLayer(nn.Module):
    """A Llama decoder layer whose sublayers are optional: a removed sublayer is None and so is its
    pre-norm, so the layer holds no parameter for it and the residual stream passes through."""

    def __init__(self, config: DMSLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        has_attention = config.layer_num_key_value_heads[layer_idx] > 0
        has_mlp = config.layer_intermediate_sizes[layer_idx] > 0
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DMSLlamaAttention(config, layer_idx) if has_attention else None
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps) if has_attention else None
        self.mlp = DMSLlamaMLP(config, layer_idx) if has_mlp else None
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps) if has_mlp else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and its attention weights (None without attention, or from a backend
        that does not return them)."""
        attn_weights = None
        if self.self_attn is not None:
            attn_output, attn_weights = self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kwargs
            )
            hidden_states = hidden_states + attn_output
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights


class DMSLlamaPreTrainedModel(PreTrainedModel):
    config: DMSLlamaConfig
    config_class = DMSLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DMSLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class DMSLlamaModel(DMSLlamaPreTrainedModel):
    def __init__(self, config: DMSLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DMSLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        # `gradient_checkpointing_enable()` sets this and `_gradient_checkpointing_func` here; the layers
        # are checkpointed by this forward, not by transformers' layer base class (whose rules change).
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = _one_cache(cache, past_key_values)
        config = self.config
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = config.use_cache if use_cache is None else use_cache
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing or not config.attention_layer_indices:
            # A checkpointed layer runs twice, which would write the cache twice. Without attention
            # nothing would be cached, and transformers' caches cannot report a length then.
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=config)

        # Lengths and masks are read from cache slot 0, the first attention layer's.
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length(0) if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if isinstance(attention_mask, dict):  # already prepared per layer type, e.g. by `generate`
            causal_mask = attention_mask.get(config.layer_types[0])
        else:
            make_mask = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
            causal_mask = make_mask(
                config=config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                layer_idx=0,
                **{_MASK_CACHE_KEYWORD: cache},
            )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states, all_attentions = [], []
        for decoder_layer in self.layers[: config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if checkpointing:
                hidden_states, attn_weights = self._gradient_checkpointing_func(
                    decoder_layer.__call__, hidden_states, position_embeddings, causal_mask, None
                )
            else:
                hidden_states, attn_weights = decoder_layer(
                    hidden_states, position_embeddings, causal_mask, cache, **kwargs
                )
            if output_attentions:
                all_attentions.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{_OUTPUT_CACHE_FIELD: cache},
        )


class DMSLlamaForCausalLM(DMSLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DMSLlamaConfig):
        super().__init__(config)
        self.model = DMSLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            # 0 keeps every position (slice(-0, None) is the whole sequence).
            hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )


__all__ = ["DMSLlamaPreTrainedModel", "DMSLlamaModel", "DMSLlamaForCausalLM"]
