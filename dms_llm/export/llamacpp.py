"""Running exported GGUF files in llama.cpp (through llama-cpp-python, the `llamacpp` extra): logits,
greedy decoding, perplexity and speed, measured the way dms_llm measures the transformers model, so the
two can be compared number for number.
"""

from __future__ import annotations

import math
import time

import numpy as np

# ggml's type id for f32. llama.cpp keeps its KV cache in f16 by default, which moves logits by up to
# ~0.6 on pruned SmolLM2 (its residual stream carries values near 25,000); comparisons use an f32 cache.
GGML_TYPE_F32 = 0


def load(path: str, n_ctx: int = 512, threads: int = 1, logits_all: bool = True, f32_cache: bool = True):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("llama.cpp checks need llama-cpp-python: pip install '.[llamacpp]' (builds llama.cpp, 15-30 min)") from e

    cache = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False, **cache)  # fmt: skip


def logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of one sequence evaluated from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, prompt: list[int], steps: int) -> list[int]:
    """The prompt followed by `steps` greedy tokens, decoding one token at a time through the KV cache."""
    llm.reset()
    llm.eval(list(prompt))
    out = list(prompt)
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def window_nll(llm, windows) -> tuple[float, int]:
    """(sum of NLL in nats, predicted tokens) over windows evaluated independently: the rule of
    `dms_llm.evaluation.window_nll` (each window predicts its tokens 1..L-1)."""
    total, count = 0.0, 0
    for window in windows.tolist():
        scores = logits(llm, window)[:-1].astype(np.float64)
        top = scores.max(-1, keepdims=True)
        log_z = (top[:, 0] + np.log(np.exp(scores - top).sum(-1)))
        total += float((log_z - scores[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return total, count


def perplexity(llm, windows) -> float:
    total, count = window_nll(llm, windows)
    return math.exp(total / count)


class Timer:
    """Wall and CPU seconds of this process. With one llama.cpp thread, CPU time is what the model
    costs even when other jobs share the machine; wall time is what a user waits on an idle one."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def prompt_processing(llm, ids: list[int]) -> Timer:
    """Prompt processing: one batch of `ids` from an empty context."""
    llm.reset()
    with Timer() as timer:
        llm.eval(list(ids))
    return timer


def generation(llm, first: int, steps: int) -> Timer:
    """Generation: `steps` single-token evaluations after one token (the tokens fed are fixed, so every
    model does the same work whatever it would have sampled)."""
    llm.reset()
    llm.eval([first])
    with Timer() as timer:
        for i in range(steps):
            llm.eval([(first + i + 1) % llm.n_vocab()])
    return timer
