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


# ----- the speed benchmark (eval/bench_llamacpp.py and `dms-llm benchmark --llamacpp`) -------------------

# What the engine issue asks of a pruned model in llama.cpp: tokens/s >= GOAL x (dense params / pruned params).
GOALS = {"pp": 0.9, "tg": 0.8}


def checkpoint_key(folder: str) -> str:
    """Changes whenever the checkpoint's files change (names, sizes, mtimes)."""
    import hashlib
    import os

    h = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def checkpoint_parameters(folder: str) -> int:
    """Parameters in a checkpoint's files (every tensor, as the GGUF export sees them)."""
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    total = 0
    for name in ckpt.names():
        n = 1
        for d in ckpt.shape(name):
            n *= d
        total += n
    return total


def gguf_file(work: str, name: str, folder: str, outtype: str, threads: int = 0) -> str:
    """WORK/NAME-KEY-OUTTYPE.gguf exported from `folder` (once: the key changes with the checkpoint's files).
    `threads`: llama.cpp's quantizer threads for the k-quants (0: every core)."""
    import os

    from .gguf import export_gguf

    path = os.path.join(work, f"{name}-{checkpoint_key(folder)}-{outtype}.gguf")
    if not os.path.isfile(path):
        os.makedirs(work, exist_ok=True)
        export_gguf(folder, path, outtype, progress=False, threads=threads)
    return path


def interleaved_speed(files: dict, threads: int = 1, reps: int = 7, pp: int = 512, tg: int = 128, log=None) -> dict:
    """Prompt processing (`pp` tokens from an empty context) and generation (`tg` single-token steps) in
    tokens/s for every GGUF file of `files` ({name: path}), all models interleaved within each repetition
    after one warm-up each; medians. Returns {name: {"pp", "tg", "pp_wall", "pp_cpu", "tg_wall", "tg_cpu",
    "samples"}, "clock", "load_average_max"}: `pp`/`tg` are per CPU second with one thread on a busy
    machine (load average above 1.5 at any repetition), else per wall second."""
    import os
    import statistics

    llms = {n: load(path, n_ctx=pp + tg + 8, threads=threads, logits_all=False, f32_cache=False) for n, path in files.items()}
    prompt = list(range(10, 10 + pp))
    samples = {n: {f"{k}_{clock}": [] for k in ("pp", "tg") for clock in ("wall", "cpu")} for n in files}
    loads = [os.getloadavg()[0]]
    try:
        for llm in llms.values():  # warm-up: first calls allocate buffers
            prompt_processing(llm, prompt)
            generation(llm, 11, 8)
        for rep in range(reps):
            for n, llm in llms.items():
                for kind, timer, tokens in (("pp", prompt_processing(llm, prompt), pp), ("tg", generation(llm, 11, tg), tg)):
                    samples[n][f"{kind}_wall"].append(tokens / timer.wall)
                    samples[n][f"{kind}_cpu"].append(tokens / timer.cpu)
            loads.append(os.getloadavg()[0])
            if log:
                log(f"repetition {rep + 1}/{reps}")
    finally:
        for llm in llms.values():
            llm.close()
    result = {n: {k: statistics.median(v) for k, v in s.items()} | {"samples": s} for n, s in samples.items()}
    # With one thread and a busy machine, CPU time is the fair clock; otherwise wall time.
    clock = "cpu" if threads == 1 and max(loads) > 1.5 else "wall"
    for n in files:
        result[n]["pp"], result[n]["tg"] = result[n][f"pp_{clock}"], result[n][f"tg_{clock}"]
    result["clock"], result["load_average_max"] = clock, max(loads)
    return result
