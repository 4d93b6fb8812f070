"""Calibration passes: a model run over calibration blocks batch by batch, with forward hooks that collect
statistics and are removed afterwards, however the pass ends (the baselines' scores, the refit)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (cpu for an object without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def batches(blocks: torch.Tensor, batch_size: int):
    if blocks is None or blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError("calibration blocks must be a non-empty [num_samples, seq_len] LongTensor (data.load_calibration)")
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i : i + batch_size]


@contextmanager
def removed_after(handles: list):
    """Removes the hook handles when the block ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
