"""ShortGPT: remove the whole layers whose output differs least from their input.

ShortGPT (Men, Xu, Zhang, Lin, Lu, Han, Chen 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect") measures each decoder layer's Block Influence

    BI_l = 1 - E_tokens[ cos(x_l, x_{l+1}) ]

(x_l the hidden state entering layer l, x_{l+1} the one leaving it) on calibration text, and deletes the
layers with the lowest BI. Here layers are deleted in that order until the parameter count fits the
budget, so the result lands below the budget by up to one layer's parameters (whole layers are coarse).
Simplified: BI is measured once on the dense model (as in the paper); no sublayer-level variant.
"""

from __future__ import annotations

import torch

from ..arch import ModelParts
from ..budget import ParameterCounter
from ..method import DEFAULT_ALIGN
from ..passes import batches, model_device, removed_after
from .common import BudgetError, build_plan, check_budget, check_target, source_name


def _hidden(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def block_influence(model, blocks: torch.Tensor, batch_size: int = 8) -> list[float]:
    parts = ModelParts(model)
    n = len(parts.layers)
    total = torch.zeros(n, dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(parts.layers):
        def pre(m, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def post(m, args, kwargs, out, i=i):
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), _hidden(out).float(), dim=-1)
            total[i] += cos.double().sum().cpu()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    device = model_device(model)
    with removed_after(handles):
        for ids in batches(blocks, batch_size):
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    return (1 - total / count).tolist()


def shortgpt_plan(model, calib_blocks, target_params: int, batch_size: int = 8, source_model: str | None = None,
                  align: int = DEFAULT_ALIGN):
    """`align` is accepted for the common signature: whole layers go, every width stays as it was."""
    target = check_target(model, target_params)
    s = ModelParts(model).shapes
    bi = block_influence(model, calib_blocks, batch_size)
    order = sorted(range(s.num_layers), key=lambda i: (bi[i], i))
    count = ParameterCounter(model).sizes
    kv, ch = list(s.num_kv_heads), list(s.intermediate)
    removed = []
    for i in order[:-1]:  # at least one layer stays
        if count(kv, ch) <= target:
            break
        kv[i], ch[i] = 0, 0
        removed.append(i)
    if count(kv, ch) > target:
        raise BudgetError(f"target {target:,} is below one layer plus the embeddings ({count(kv, ch):,}); ShortGPT removes whole layers only")
    meta = {"method": "shortgpt", "criterion": "block influence 1 - mean cos(x_in, x_out)", "allocation": "whole layers",
            "block_influence": bi, "removed_layers": sorted(removed), "calibration_tokens": int(calib_blocks.numel())}
    plan = build_plan(model, {i: [] for i in removed}, {i: [] for i in removed}, source_name(model, source_model), meta)
    return check_budget(plan, count(kv, ch), target)
