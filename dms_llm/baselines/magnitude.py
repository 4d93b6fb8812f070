"""Magnitude pruning: the L2 norm of each structure's weights, the same fraction removed in every layer.

The data-free reference point of structured pruning (used as the "L2 / magnitude" baseline by
LLM-Pruner, Ma et al. 2023, and FLAP, An et al. 2024). A KV group's weights are its q/k/v rows and the
matching o_proj columns; an MLP channel's are its gate/up rows and its down_proj column. Known to fail
on models whose few huge-activation channels have ordinary weights (SmolLM2: layers 0, 28 and 29).
"""

from __future__ import annotations

import torch

from ..arch import ModelParts
from ..method import DEFAULT_ALIGN
from .common import check_target, source_name, uniform_plan, weight_sq_norms


@torch.no_grad()
def magnitude_plan(model, calib_blocks=None, target_params: int = 0, source_model: str | None = None, align: int = DEFAULT_ALIGN):
    """`calib_blocks` is accepted for the common signature and ignored (the criterion is data-free)."""
    target = check_target(model, target_params)
    parts = ModelParts(model)
    heads, chans = {}, {}
    for i in range(parts.shapes.num_layers):
        h, c = weight_sq_norms(parts, i)
        if h is not None:
            heads[i] = h.sqrt()
        if c is not None:
            chans[i] = c.sqrt()
    meta = {"method": "magnitude", "criterion": "L2 norm of the structure's weights", "allocation": "uniform"}
    return uniform_plan(model, heads, chans, target, source_name(model, source_model), meta, align=align)
