"""Wanda-sp: Wanda's |W| x ||X|| score summed over each structure, the same fraction removed per layer.

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models") scores a
weight W_ij by |W_ij| * ||X_j||_2, X_j being input feature j over the calibration tokens. Its structured
variant, as FLAP (An et al. 2024) defines and benchmarks it ("Wanda-sp"), scores the input channels of the
layers that read a pruned structure's output: a channel c of down_proj gets sum_i |W_down[i, c]| * ||X_c||,
a KV group the same sum over the o_proj columns of its query heads; layers are pruned uniformly.
Simplified: statistics are gathered in one pass of the dense model (not layer by layer on the partly
pruned model); the KV group (GQA) is the unit, as everywhere in dms_llm.
"""

from __future__ import annotations

import torch

from ..arch import ModelParts
from ..method import DEFAULT_ALIGN
from .common import check_target, output_proj_input_stats, per_group, source_name, uniform_plan


@torch.no_grad()
def wanda_sp_scores(model, stats) -> tuple[dict, dict]:
    parts = ModelParts(model)
    heads, chans = {}, {}
    for i in range(parts.shapes.num_layers):
        if f"{i}.attention" in stats:
            w = parts.attn_proj(i, "o").weight.float().abs().sum(0).double()
            heads[i] = per_group(w * stats[f"{i}.attention"].norm, parts, i)
        if f"{i}.mlp" in stats:
            w = parts.mlp_proj(i, "down").weight.float().abs().sum(0).double()
            chans[i] = w * stats[f"{i}.mlp"].norm
    return heads, chans


def wanda_sp_plan(model, calib_blocks, target_params: int, batch_size: int = 8, source_model: str | None = None,
                  align: int = DEFAULT_ALIGN):
    target = check_target(model, target_params)
    stats = output_proj_input_stats(model, calib_blocks, batch_size)
    heads, chans = wanda_sp_scores(model, stats)
    meta = {"method": "wanda-sp", "criterion": "sum |W| * ||X|| over o_proj/down_proj input columns",
            "allocation": "uniform", "calibration_tokens": int(calib_blocks.numel())}
    return uniform_plan(model, heads, chans, target, source_name(model, source_model), meta, align=align)
