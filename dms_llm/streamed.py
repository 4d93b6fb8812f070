"""A model whose weights exist only while the module that uses them runs: the check of a pruned model
without a pruned copy in memory.

    model = skeleton(plan.pruned_config(), torch.bfloat16)      # parameters on the meta device
    with streamed(model, read):                                  # read(name) -> that parameter's tensor
        logits = model(input_ids=ids).logits                     # the stock forward, one layer at a time

`skeleton` builds a model from its config with every parameter on the meta device (no memory) and its
buffers (the rotary frequencies) real, as the config computes them. Inside `streamed`, the parameters
outside the decoder layers (embeddings, final norm, head: needed before and after every layer) are read
once, and each decoder layer's parameters are read when the layer's forward starts and dropped when it
ends, so the resident weights are those top-level tensors plus one layer, whatever the depth. `read`
decides where a tensor comes from: a written checkpoint's files, or a source model sliced on demand by a
plan (`prune.pruned_tensor_reader`). Inference only: the tensors are read without gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .arch import ModelParts


def skeleton(config, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The causal LM of `config` in `dtype` (and `attn_implementation`, default transformers' choice):
    parameters on the meta device, buffers real."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    from .prune import _model_class

    # Buffers stay real: they are derived from the config (rotary frequencies), are not in checkpoints,
    # and a meta buffer could not be filled from the files.
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = _model_class(config)._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def _fill(module: nn.Module, read: Callable[[str], torch.Tensor], prefix: str, names: list[str], device) -> None:
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        old = owner._parameters[attr]
        value = read(prefix + name)
        if tuple(value.shape) != tuple(old.shape):
            raise RuntimeError(f"streamed: {prefix + name} read with shape {tuple(value.shape)}, the model has {tuple(old.shape)}")
        owner._parameters[attr] = nn.Parameter(value.to(device=device, dtype=old.dtype), requires_grad=False)


def _release(module: nn.Module, names: list[str]) -> None:
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)


@contextmanager
def streamed(model: nn.Module, read: Callable[[str], torch.Tensor], device="cpu"):
    """Run `model` (from `skeleton`) with its parameters read through `read(full_name)` and moved to
    `device`: the top-level ones for the whole block, each decoder layer's for its own forward. Buffers
    move to `device` too. Every parameter goes back to the meta device on exit, however the block ends."""
    parts = ModelParts(model)
    layer_names = {id(layer): f"{parts.spec.decoder}.{parts.spec.layers}.{i}." for i, layer in enumerate(parts.layers)}
    in_layers = {id(p) for layer in parts.layers for p in layer.parameters()}
    # A tied head is the embedding's parameter: named once, filled once, and both modules see it.
    top = [n for n, p in model.named_parameters() if id(p) not in in_layers]
    handles = []

    def pre(layer, args, kwargs):
        _fill(layer, read, layer_names[id(layer)], [n for n, _ in layer.named_parameters()], device)

    def post(layer, args, kwargs, output):
        _release(layer, [n for n, _ in layer.named_parameters()])

    try:
        for layer in parts.layers:
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True, always_call=True))
        for module in model.modules():  # the buffers (model.to would try to copy the meta parameters)
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
        _fill(model, read, "", top, device)
        model.tie_weights()
        yield model
    finally:
        for handle in handles:
            handle.remove()
        _release(model, [n for n, _ in model.named_parameters()])
        model.tie_weights()
