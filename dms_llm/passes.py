"""Calibration passes: a model run over calibration blocks batch by batch, with forward hooks that collect
statistics and are removed afterwards, however the pass ends (the baselines' scores, the refit), and the
next-token loss over windows (`window_nll`: evaluation's perplexity and the search's held-out loss)."""

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


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True, desc: str = "ppl") -> tuple[float, int]:
    """(sum of NLL in nats, number of predicted tokens) over the windows, each window on its own."""
    from tqdm.auto import tqdm

    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        starts = range(0, windows.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # fp32 log-softmax whatever the model dtype: bf16 logits lose ~2 digits in the loss.
            logits = logits[:, :-1, :].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            # fp64 sum: an fp32 sum over ~300k tokens drifts in the 6th digit.
            total += nll.double().sum().cpu()
            count += targets.numel()
    finally:
        model.train(was_training)
    return total.item(), count
