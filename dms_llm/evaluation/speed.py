"""Inference speed of a model, and of models relative to each other, on the machine at hand.

    from dms_llm.evaluation.speed import prefill_tokens_per_s, decode_tokens_per_s, relative_speed
    prefill_tokens_per_s(model, batch=1, seq_len=128, reps=5)       # tokens/s, median of reps
    relative_speed({"dense": dense, "pruned": small}, reference="dense", reps=5)

Prefill = one forward over a [batch, seq_len] prompt. Decode = greedy single-token steps with the KV
cache after a prompt (the prompt's own forward is not timed), so it measures what generation pays per
new token. Speeds are medians over `reps` timed runs after one untimed warm-up run; `relative_speed`
interleaves the models run by run, so a machine whose load drifts (shared CPUs) slows all of them alike
and the ratios stay meaningful.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch

from ..passes import model_device


def _cache_keyword(model) -> str:
    """The forward keyword of the KV cache: `cache` from transformers 5.24 (which still takes
    `past_key_values`, with a deprecation warning), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    """The KV cache a forward returned, under either name (the output field was renamed with the keyword)."""
    return out.get("cache", out.get("past_key_values"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(min(3, vocab - 1), vocab, (batch, length), generator=g).to(model_device(model))


@torch.inference_mode()
def time_prefill(model, batch: int = 1, seq_len: int = 128) -> float:
    """Seconds for one forward over a [batch, seq_len] prompt (no cache)."""
    ids = _prompt(model, batch, seq_len)
    device = model_device(model)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model, prompt_len: int = 32, new_tokens: int = 32, batch: int = 1) -> float:
    """Seconds for `new_tokens` greedy decode steps after a `prompt_len` prompt (prompt forward untimed).

    Models without a cache (e.g. a `dms_llama` model that kept no attention) recompute the sequence
    each step, which is what `generate` does for them too."""
    ids = _prompt(model, batch, prompt_len)
    device = model_device(model)
    use_cache = bool(getattr(model.config, "use_cache", True))
    out = model(input_ids=ids, use_cache=use_cache)
    cache = _output_cache(out) if use_cache else None
    keyword = _cache_keyword(model)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        if cache is not None:
            out = model(input_ids=nxt, use_cache=True, **{keyword: cache})
            cache = _output_cache(out)
        else:
            ids = torch.cat([ids, nxt], dim=1)
            out = model(input_ids=ids, use_cache=False)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def _median_rate(tokens: int, times: list[float]) -> float:
    return tokens / statistics.median(times)


def prefill_tokens_per_s(model, batch: int = 1, seq_len: int = 128, reps: int = 5) -> float:
    time_prefill(model, batch, seq_len)  # warm-up: allocator, kernels, lazy init
    return _median_rate(batch * seq_len, [time_prefill(model, batch, seq_len) for _ in range(reps)])


def decode_tokens_per_s(model, prompt_len: int = 32, new_tokens: int = 32, reps: int = 5, batch: int = 1) -> float:
    time_decode(model, prompt_len, min(new_tokens, 2), batch)
    return _median_rate(batch * new_tokens, [time_decode(model, prompt_len, new_tokens, batch) for _ in range(reps)])


def relative_speed(models: dict, reference: str, reps: int = 5, batch: int = 1, seq_len: int = 128,
                   prompt_len: int = 32, new_tokens: int = 32) -> dict:
    """Prefill and decode tokens/s of every model, measured interleaved (rep r of every model before rep
    r+1 of any), plus each model's speedup over `reference` (ratio of medians)."""
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(models)}")
    if reps < 1:
        raise ValueError("reps must be at least 1")
    for m in models.values():  # warm-up, untimed
        time_prefill(m, batch, seq_len)
        time_decode(m, prompt_len, min(new_tokens, 2), batch)
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            pre[k].append(time_prefill(m, batch, seq_len))
        for k, m in models.items():
            dec[k].append(time_decode(m, prompt_len, new_tokens, batch))
    out = {}
    for k in models:
        p, d = _median_rate(batch * seq_len, pre[k]), _median_rate(batch * new_tokens, dec[k])
        out[k] = {"prefill_tokens_per_s": p, "decode_tokens_per_s": d}
    for k in models:
        out[k]["prefill_speedup"] = out[k]["prefill_tokens_per_s"] / out[reference]["prefill_tokens_per_s"]
        out[k]["decode_speedup"] = out[k]["decode_tokens_per_s"] / out[reference]["decode_tokens_per_s"]
    settings = dict(reps=reps, batch=batch, seq_len=seq_len, prompt_len=prompt_len, new_tokens=new_tokens,
                    threads=torch.get_num_threads(), device=str(model_device(models[reference])))
    return {"models": out, "settings": settings}
