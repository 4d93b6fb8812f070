"""LLM-Pruner's block-wise first-order Taylor importance, uniform over the middle layers.

LLM-Pruner (Ma, Fang, Wang 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models")
groups coupled weights (a head with its q/k/v rows and o_proj columns; an MLP channel with its gate/up
rows and down_proj column) and scores a group by the first-order Taylor estimate of the loss change when
its weights are removed, |w * dL/dw| per weight, summed over the group ("param_first" / element-wise
first order). The loss is the language-modelling loss on calibration text. Its Llama-7B recipe prunes
only layers 4..29 of 32 ("block-wise", the first 4 and last 2 layers are spared) with one ratio for all
pruned layers; here those counts scale with depth (round(4/32 L) first, round(2/32 L) last layers spared).

Simplified: the second-order term (the "element2" / Hessian-diagonal variant) is not implemented; the
unit is the KV group (GQA), whose group score sums its query heads; gradients are accumulated over all
calibration blocks (LLM-Pruner uses 10 short samples) and the same blocks as every other method are used.
"""

from __future__ import annotations

import torch

from ..arch import ModelParts
from ..method import DEFAULT_ALIGN
from ..passes import batches, model_device
from .common import check_target, source_name, uniform_plan, weight_sq_norms

PROJ = (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))


def default_layers(num_layers: int) -> tuple[int, int]:
    """[start, end) of the pruned layers: LLM-Pruner's 4..30 of 32 scaled to the model's depth."""
    start, end = round(4 * num_layers / 32), num_layers - round(2 * num_layers / 32)
    return (start, end) if end > start else (0, num_layers)


def taylor_scores(model, blocks: torch.Tensor, layers: list[int], batch_size: int = 4) -> tuple[dict, dict]:
    """Per layer in `layers`: sum over each KV group / MLP channel of |w * dL/dw| (dL/dw summed over all
    calibration tokens of the mean next-token loss)."""
    parts = ModelParts(model)
    weights = []
    for i in layers:
        for where, which in PROJ:
            m = parts.attn_proj(i, which) if where == "attn" else parts.mlp_proj(i, which)
            if m is not None:
                weights.append(m.weight)
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        device, n = model_device(model), blocks.shape[0]
        for ids in batches(blocks, batch_size):
            ids = ids.to(device)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            (out.loss * ids.shape[0] / n).backward()  # the mean over blocks, however they are batched
        with torch.no_grad():
            heads, chans = {}, {}
            for i in layers:
                h, c = weight_sq_norms(parts, i, fn=lambda w: (w.detach().float() * w.grad.float()).abs())
                if h is not None:
                    heads[i] = h
                if c is not None:
                    chans[i] = c
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return heads, chans


def llm_pruner_plan(model, calib_blocks, target_params: int, layer_start: int | None = None, layer_end: int | None = None,
                    batch_size: int = 4, source_model: str | None = None, align: int = DEFAULT_ALIGN):
    target = check_target(model, target_params)
    n = ModelParts(model).shapes.num_layers
    start, end = default_layers(n)
    start = start if layer_start is None else layer_start
    end = end if layer_end is None else layer_end
    if not 0 <= start < end <= n:
        raise ValueError(f"llm-pruner: pruned layers [{start}, {end}) must lie within [0, {n})")
    layers = list(range(start, end))
    heads, chans = taylor_scores(model, calib_blocks, layers, batch_size)
    meta = {"method": "llm-pruner", "criterion": "first-order Taylor |w * dL/dw| summed over the group",
            "allocation": "uniform over the pruned layers", "layer_range": [start, end],
            "calibration_tokens": int(calib_blocks.numel())}
    return uniform_plan(model, heads, chans, target, source_name(model, source_model), meta, layers=layers, align=align)
