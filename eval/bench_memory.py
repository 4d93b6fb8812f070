"""Peak memory and step time of the search steps at Llama-2-7B / Llama-3-8B / Llama-2-70B shapes, measured with
a few decoder layers (random bf16 weights, CPU) and extrapolated per layer to the full models.

    python eval/bench_memory.py run                  # the default grid, smallest cells first, cached per cell
    python eval/bench_memory.py run --shapes llama-2-7b --kinds frozen --seq-lens 512 --depths 1,2
    python eval/bench_memory.py overhead             # mask overhead (eval/bench_overhead.py) at these shapes
    python eval/bench_memory.py report               # tables: cells, per-layer fits and their check, GPU plan

A *cell* is one (shape, step kind, gradient checkpointing, batch x sequence, depth). Each is measured in a
fresh Python process (allocator state never leaks between cells) that builds the model with `depth`
decoder layers, wires it exactly as `dms_llm.prepare` does for that kind, with the library's own functions
(`ModelMasks.for_method` + `MaskHooks`, `prepare_weights` for the freeze, LoRA, gradient checkpointing and the
teacher, the training `Engine` with bf16 autocast, `SearchLoop.step`) and runs `--steps` full search steps (the
first one is a warm-up: it allocates the optimiser state). The CPU only: CUDA is hidden from the cells.

Step kinds (`--kinds`):
  frozen          frozen weights, no distillation (the SmolLM2 recipes, the default search)
  lora_distill    LoRA r=8 on all seven projections + KL to the unmasked model (the 7B/8B recipes)
  frozen_distill  frozen weights + KL to the unmasked model (the 70B recipe)

Memory: the process's peak resident set during the steps (VmHWM after a reset through /proc/self/clear_refs)
minus its resident set before the model was built, with glibc told to return every freed block of 128 KiB or
more to the system (MALLOC_MMAP_THRESHOLD_), so that the peak follows the live tensors. The analytic parts are
recorded beside it: weight bytes (embedding/head vs per layer), trainable parameters, optimiser state, the
bytes autograd saved for backward (without checkpointing), the logits' size. Time: CPU and wall seconds per step
after the warm-up (median), with the 1-minute load average before each step, one torch thread (on a shared
machine the process's CPU time leaves out the waits for a core; fits and ratios use it).

Per-layer extrapolation: for each (shape, kind, checkpointing, tokens), memory = a + b*L and time = c + d*L are
fitted on the two smallest measured depths and checked against any further measured depth; `report` prints the
error of that check and the values at the full depth (32 or 80 layers), then the GPU plan derived from them:
GPU memory = (extrapolated peak) x (1 + allocator margin) + CUDA context, and for FSDP the sharded form.

The results cache (`--results`, JSON) keeps every cell; a rerun measures only missing cells, and
`--refresh-time` re-measures existing ones and keeps every timing with its load average (the report uses the
run with the fastest step, the one least disturbed by other jobs).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

from bench_overhead import search_masks, shape_config, shape_path  # eval/ is this script's folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORMAT = "bench_memory/1"
DEFAULT_RESULTS = os.path.join(REPO, "eval", "results", "bench_memory.json")
GIB = 1024**3

# kind -> (train_weights, distill), the search options each step kind stands for
KINDS = {"frozen": ("none", False), "lora_distill": ("lora", True), "frozen_distill": ("none", True)}
STRUCTURES = "heads,channels,hidden,layers"
LORA_R, LORA_ALPHA = 8, 16

# Environment of every measuring process: one thread; freed blocks of 128 KiB or more go back to the system
# at once (so the resident set follows the live tensors instead of glibc's free lists); torch asks for
# transparent huge pages on large blocks (page faults on fresh blocks would otherwise cost time).
CELL_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
            "MALLOC_TRIM_THRESHOLD_": "131072", "THP_MEM_ALLOC_ENABLE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

# GPU derivation (see docs/RESULTS.md): a CUDA context + cuBLAS workspace, and the caching allocator's
# rounding/fragmentation on top of the live tensors measured here. Assumptions, not measurements.
CUDA_CONTEXT_GIB = 1.0
ALLOCATOR_MARGIN = 0.10
GPU_SIZES_GB = (24, 40, 48, 80, 141)  # common cards: 24 GB (RTX 4090/A10G), 40/80 GB A100, 48 GB L40S/A6000, 80 GB H100, 141 GB H200


# ----- cells --------------------------------------------------------------------------------------
def cell_key(c: dict) -> str:
    return f"{c['shape']}/{c['kind']}/{'ckpt' if c['ckpt'] else 'nockpt'}/b{c['batch']}x{c['seq']}/L{c['depth']}"


def group_key(c: dict) -> str:
    return f"{c['shape']}/{c['kind']}/{'ckpt' if c['ckpt'] else 'nockpt'}/b{c['batch']}x{c['seq']}"


def make_cell(shape, kind, ckpt, batch, seq, depth, mixed_precision="bf16") -> dict:
    if kind not in KINDS:
        raise SystemExit(f"error: unknown step kind {kind!r}; choose from {', '.join(KINDS)}")
    return {"shape": shape, "kind": kind, "ckpt": bool(ckpt), "batch": int(batch), "seq": int(seq), "depth": int(depth),
            "mixed_precision": mixed_precision}


def shape_facts(shape: str) -> dict:
    """Parameter counts of a shape, per decoder layer and outside the layers (embedding, head, final norm)."""
    config = shape_config(shape)
    d, v, i = config.hidden_size, config.vocab_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    layer = d * q * 2 + d * kv * 2 + 3 * d * i + 2 * d
    outside = v * d * (1 if config.tie_word_embeddings else 2) + d
    return {"layers": config.num_hidden_layers, "layer_params": layer, "outside_params": outside, "hidden": d,
            "vocab": v, "intermediate": i, "q_dim": q, "kv_dim": kv,
            "params": outside + layer * config.num_hidden_layers,
            "lora_params_per_layer": LORA_R * ((d + q) * 2 + (d + kv) * 2 + (d + i) * 3)}


def step_flops(shape: str, kind: str, ckpt: bool, batch: int, seq: int, depth: int) -> float:
    """Matrix-product FLOPs of one search step (forward 2 per multiply-add; the input-gradient backward costs
    one forward of the linear layers and two of attention; no weight gradients except LoRA's, neglected).
    A cost model for ordering cells and for reading the times, not a measurement."""
    f = shape_facts(shape)
    tokens = batch * seq
    linear = 2 * tokens * (f["layer_params"] - 2 * f["hidden"])  # per layer forward
    attention = 2 * batch * seq * seq * f["q_dim"]  # causal QK^T and AV, per layer forward
    head = 2 * tokens * f["vocab"] * f["hidden"]
    layer_fwd = linear + attention
    student = (layer_fwd + linear + 2 * attention) * depth + 2 * head  # forward + input-gradient backward
    if ckpt:
        student += layer_fwd * depth  # recomputed forward
    teacher = (layer_fwd * depth + head) if KINDS[kind][1] else 0
    return float(student + teacher)


def default_grid() -> list[dict]:
    """The issue's grid (7B/8B x frozen/LoRA+KD x checkpointing x 512/2048 tokens at depths 1, 2), the recipes'
    own micro-batches (4 x 512 for 7B/8B, 1 x 512 frozen + KD for 70B) and the depth checks."""
    cells = []
    for shape, kind, ckpt, seq, depth in itertools.product(("llama-2-7b", "llama-3-8b"), ("frozen", "lora_distill"),
                                                           (False, True), (512, 2048), (1, 2)):
        cells.append(make_cell(shape, kind, ckpt, 1, seq, depth))
    for shape, depth in (("llama-2-7b", 1), ("llama-2-7b", 2), ("llama-3-8b", 1), ("llama-3-8b", 2)):
        cells.append(make_cell(shape, "lora_distill", True, 4, 512, depth))
    for ckpt, depth in itertools.product((True, False), (1, 2)):
        cells.append(make_cell("llama-2-70b", "frozen_distill", ckpt, 1, 512, depth))
    # checks of the per-layer fit at a further depth: one cell that keeps every activation (no checkpointing),
    # the 7B recipe's micro-batch, and the 70B recipe's
    cells.append(make_cell("llama-2-7b", "frozen", False, 1, 2048, 4))
    cells.append(make_cell("llama-2-7b", "lora_distill", True, 4, 512, 4))
    cells.append(make_cell("llama-2-70b", "frozen_distill", True, 1, 512, 3))
    return cells


def cell_cost(c: dict) -> float:
    return step_flops(c["shape"], c["kind"], c["ckpt"], c["batch"], c["seq"], c["depth"])


# ----- measuring one cell (in its own process) ----------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load1() -> float:
    return round(os.getloadavg()[0], 2)


class SavedTensorBytes:
    """Counts the distinct storages autograd saves for backward (activations), parameters excluded."""

    def __init__(self, model):
        import torch

        self._exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
        except Exception:  # noqa: BLE001 (tensor subclasses without storage)
            return t
        ptr = storage.data_ptr()
        if ptr not in self._exclude:
            self.storages[ptr] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def search_settings(cell: dict):
    """(DMSConfig, RunSettings) of the search a cell stands for: the recipes' learning rates, LoRA r=8 and the
    cell's weights, distillation, gradient checkpointing, micro-batch and mixed precision."""
    from dms_llm import DMSConfig, RunSettings
    from dms_llm.method import parse_structures

    train_weights, distill = KINDS[cell["kind"]]
    config = DMSConfig(structures=parse_structures(STRUCTURES), steps=10**6, ratio_lr=5e-3, weight_lr=1e-4, budget_weight=2.0,
                       train_weights=train_weights, lora_r=LORA_R, lora_alpha=LORA_ALPHA, distill=distill)
    run = RunSettings(batch_size=cell["batch"], mixed_precision=cell["mixed_precision"], gradient_checkpointing=cell["ckpt"])
    return config, run


def measure_cell(cell: dict, steps: int = 2) -> dict:
    """Build the cell's model and run `steps` search steps; memory and time as described in the module doc."""
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401  (imported before the baseline: libraries are not the cell's memory)
    from transformers import AutoModelForCausalLM

    from dms_llm import MaskHooks, ParameterCounter
    from dms_llm.training.dms import SearchLoop, SearchModule, prepare_weights  # the wiring `dms_llm.prepare` runs
    from dms_llm.training.engine import Engine

    if steps < 1:
        raise ValueError("steps must be at least 1")
    method, run = search_settings(cell)
    engine = Engine(run, verbose=False)
    config = shape_config(cell["shape"], cell["depth"])
    gc.collect()
    base = rss_bytes()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    build_s = time.perf_counter() - t0
    model_rss = rss_bytes() - base
    outside = [model.get_input_embeddings().weight, model.get_output_embeddings().weight, model.model.norm.weight]
    weight_bytes = _tensor_bytes(model.parameters())
    outside_bytes = _tensor_bytes({id(t): t for t in outside}.values())
    # as `dms_llm.prepare` does it, in its order; the masks with distinct importances: the search's real (soft) path
    masks = search_masks(config, method, 0.9)
    counter = ParameterCounter(model)
    hooked, peft_model, weight_params, teacher = prepare_weights(method, run, model, masks)
    MaskHooks(hooked, masks).install()
    blocks = torch.randint(0, config.vocab_size, (cell["batch"], cell["seq"]), generator=torch.Generator().manual_seed(0))
    loop = SearchLoop(engine, SearchModule(hooked, masks), masks, counter, blocks, method, int(0.8 * counter.dense()),
                      teacher, weight_params)
    trainable = [p for p in hooked.parameters() if p.requires_grad] + masks.ratio_parameters()
    gc.collect()
    setup_rss = rss_bytes() - base
    peaks, after, times, cpu_times, loads, saved = [], [], [], [], [], None
    resettable = True
    for i in range(steps):
        gc.collect()
        resettable = reset_peak() and resettable
        loads.append(load1())
        counting = SavedTensorBytes(hooked) if i == 0 and not cell["ckpt"] else nullcontext()
        start, start_cpu = time.perf_counter(), time.process_time()
        with counting:
            loop.step(i)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
        peaks.append(peak_bytes() - base)
        after.append(rss_bytes() - base)
        if i == 0 and not cell["ckpt"]:
            saved = counting.total
    optimizer_bytes = sum(_tensor_bytes(v for v in state.values() if torch.is_tensor(v))
                          for state in loop.optimizer.state.values())
    timed, timed_cpu = times[1:] or times, cpu_times[1:] or cpu_times
    return {
        **cell,
        "steps": steps,
        "peak_bytes": max(peaks),
        "peak_bytes_per_step": peaks,
        "peak_reset": resettable,
        "model_rss_bytes": model_rss,
        "setup_rss_bytes": setup_rss,
        "after_step_rss_bytes": after,
        "weight_bytes": weight_bytes,
        "outside_weight_bytes": outside_bytes,
        "layer_weight_bytes": (weight_bytes - outside_bytes) // cell["depth"],
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": _tensor_bytes(trainable),
        "optimizer_state_bytes": optimizer_bytes,
        "saved_activation_bytes": saved,
        "logits_bytes_bf16": cell["batch"] * cell["seq"] * config.vocab_size * 2,
        "step_s": statistics.median(timed),
        "step_s_all": times,
        "step_cpu_s": statistics.median(timed_cpu),
        "step_cpu_s_all": cpu_times,
        "load1_before_step": loads,
        "build_s": build_s,
        "flops": step_flops(cell["shape"], cell["kind"], cell["ckpt"], cell["batch"], cell["seq"], cell["depth"]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "library_commit": library_commit(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def library_commit() -> str | None:
    """The checkout's commit (+dirty when dms_llm/ has uncommitted changes): the library a cell measured."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--", "dms_llm") else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----- the cache and the driver -------------------------------------------------------------------
def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise SystemExit(f"error: {path} is not a {FORMAT} results file")
        data.setdefault("cells", {})
        data.setdefault("overhead", {})
        return data
    return {"format": FORMAT, "cells": {}, "overhead": {}}


def save_results(data: dict, path: str) -> None:
    from dms_llm.files import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def rough_need(cell: dict) -> int:
    """A generous guess of a cell's memory, to skip a cell the machine cannot hold right now."""
    f = shape_facts(cell["shape"])
    weights = 2 * (f["outside_params"] + f["layer_params"] * cell["depth"])
    tokens = cell["batch"] * cell["seq"]
    per_layer = tokens * (f["hidden"] * 12 + f["intermediate"] * 6 + f["q_dim"] * 4) * 2  # bf16 activations, generous
    logits = tokens * f["vocab"] * 4 * 6
    return int(weights * 1.2 + per_layer * cell["depth"] + logits + 1.5 * GIB)


def run_in_subprocess(kind: str, payload: dict, timeout: float) -> dict:
    env = dict(os.environ, **CELL_ENV)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", kind, json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _run_time(r: dict) -> float:
    """A timing run's figure of merit: its CPU time where measured (waits for a busy core left out), else wall."""
    return r["step_cpu_s"] if r.get("step_cpu_s") is not None else r["step_s"]


def merge_timing(old: dict | None, new: dict) -> dict:
    """Keep every timing run (wall and CPU step time, load, when) and report the fastest by CPU time;
    memory comes from the newest run."""
    runs = (old or {}).get("time_runs", [])
    if old and not runs and "step_s" in old:
        runs = [{"step_s": old["step_s"], "step_cpu_s": old.get("step_cpu_s"), "load1": old.get("load1_before_step"),
                 "at": old.get("measured_at")}]
    runs = runs + [{"step_s": new["step_s"], "step_cpu_s": new.get("step_cpu_s"), "load1": new["load1_before_step"],
                    "at": new["measured_at"]}]
    with_cpu = [r for r in runs if r.get("step_cpu_s") is not None]
    best = min(with_cpu or runs, key=_run_time)
    return {**new, "time_runs": runs, "step_s": best["step_s"], "step_cpu_s": best.get("step_cpu_s"),
            "best_load1": best["load1"], "step_s_newest": new["step_s"]}


def run_cells(cells: list[dict], path: str, steps: int, refresh_time: bool, timeout: float, dry_run: bool = False,
              retry_errors: bool = False) -> dict:
    data = load_results(path)
    todo = []
    for c in sorted(cells, key=cell_cost):
        old = data["cells"].get(cell_key(c))
        incomplete = old is not None and "error" not in old and old.get("step_cpu_s") is None  # timed before CPU time was kept
        if old is None or incomplete or refresh_time or (retry_errors and "error" in old):
            todo.append(c)
    total = sum(cell_cost(c) for c in todo)
    print(f"{len(todo)} of {len(cells)} cells to measure ({total / 1e12:.1f} TFLOP of steps x {steps}); results: {path}",
          flush=True)
    for n, c in enumerate(todo, 1):
        key = cell_key(c)
        if dry_run:
            print(f"[{n}/{len(todo)}] {key}  ~{cell_cost(c) / 1e12:.2f} TFLOP/step", flush=True)
            continue
        need, free = rough_need(c), mem_available()
        if need > free:
            print(f"[{n}/{len(todo)}] {key}: skipped, needs about {need / GIB:.1f} GiB and {free / GIB:.1f} GiB are free now",
                  flush=True)
            continue
        start, load = time.time(), load1()
        result = run_in_subprocess("cell", {"cell": c, "steps": steps}, timeout)
        data = load_results(path)  # another run may have written meanwhile
        old = data["cells"].get(key)
        if "error" in result:
            print(f"[{n}/{len(todo)}] {key}: FAILED {result['error']}", flush=True)
            if old is None or "error" in old:
                data["cells"][key] = {**c, "error": result["error"], "load1": load}
        else:
            result = merge_timing(old if old and "error" not in old else None, result)
            data["cells"][key] = result
            print(f"[{n}/{len(todo)}] {key}: peak {result['peak_bytes'] / GIB:.2f} GiB, step {result['step_s_newest']:.1f} s "
                  f"(load {load}), {time.time() - start:.0f} s wall", flush=True)
        save_results(data, path)
    return data


# ----- fits and the report ------------------------------------------------------------------------
def fit_linear(xs, ys) -> tuple[float, float]:
    """Least-squares a + b*x (exact through two points)."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError("a linear fit needs two distinct x")
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def extrapolations(cells: dict) -> list[dict]:
    """One row per (shape, kind, checkpointing, tokens) with >= 2 measured depths: the fit on the two smallest
    depths, its check on each further depth, and the values at the shape's full depth."""
    groups: dict[str, list[dict]] = {}
    for c in cells.values():
        if "error" not in c:
            groups.setdefault(group_key(c), []).append(c)
    rows = []
    for key, members in sorted(groups.items()):
        members.sort(key=lambda c: c["depth"])
        if len(members) < 2:
            continue
        fit_on, checks = members[:2], members[2:]
        xs = [c["depth"] for c in fit_on]
        a, b = fit_linear(xs, [c["peak_bytes"] for c in fit_on])
        basis = "cpu" if all(c.get("step_cpu_s") is not None for c in members) else "wall"
        step = (lambda c: c["step_cpu_s"]) if basis == "cpu" else (lambda c: c["step_s"])  # noqa: E731
        tc, td = fit_linear(xs, [step(c) for c in fit_on])
        first = members[0]
        facts = shape_facts(first["shape"])
        full = facts["layers"]
        layer_bytes = first["layer_weight_bytes"]
        row = {
            "group": key, "shape": first["shape"], "kind": first["kind"], "ckpt": first["ckpt"], "batch": first["batch"],
            "seq": first["seq"], "fit_depths": xs, "mem_a": a, "mem_b": b, "time_c": tc, "time_d": td, "time_basis": basis,
            "layer_weight_bytes": layer_bytes, "outside_weight_bytes": first["outside_weight_bytes"],
            "activation_bytes_per_layer": b - layer_bytes,  # + LoRA state per layer (tens of MB at most)
            "non_weight_intercept_bytes": a - first["outside_weight_bytes"],
            "full_depth": full, "full_peak_bytes": a + b * full, "full_step_s": tc + td * full,
            "full_weight_bytes": first["outside_weight_bytes"] + layer_bytes * full,
            "load1": sorted({x for c in members for x in (c.get("load1_before_step") or [])}),
            "checks": [],
        }
        last = xs[-1]
        for c in checks:
            pm, pt = a + b * c["depth"], tc + td * c["depth"]
            # the check's miss as a slope error from the last fitted depth, carried on to the full depth
            carried = (full - last) / (c["depth"] - last)
            row["checks"].append({"depth": c["depth"], "peak_bytes": c["peak_bytes"], "predicted_peak_bytes": pm,
                                  "peak_error": pm / c["peak_bytes"] - 1, "step_s": step(c), "predicted_step_s": pt,
                                  "time_error": pt / step(c) - 1,
                                  "full_peak_error": (pm - c["peak_bytes"]) * carried / row["full_peak_bytes"],
                                  "full_time_error": (pt - step(c)) * carried / row["full_step_s"]})
        rows.append(row)
    return rows


def gpu_bytes(live_bytes: float) -> float:
    """Device memory for `live_bytes` of tensors: allocator margin + CUDA context (assumptions, see the doc)."""
    return live_bytes * (1 + ALLOCATOR_MARGIN) + CUDA_CONTEXT_GIB * GIB


def smallest_gpu(need_bytes: float) -> int | None:
    for size in GPU_SIZES_GB:
        if need_bytes <= size * 1e9:
            return size
    return None


def fsdp_per_gpu_bytes(row: dict, n_gpus: int, prefetch_units: int = 2) -> float:
    """Live bytes per GPU with the weights sharded over n_gpus (frozen: no gradients or optimiser state to
    shard beyond the kept ratios), as `--fsdp` does it (FSDP2, one unit per decoder layer, the rest the root's):
    the weight shard, the root unit (embeddings, head, final norm) gathered through the step, `prefetch_units`
    decoder layers gathered at once (the one computing and the one prefetched), and each GPU's own
    activations, logits and buffers."""
    non_weight = row["full_peak_bytes"] - row["full_weight_bytes"]
    root_gathered = row["outside_weight_bytes"] * (1 - 1 / n_gpus)
    return row["full_weight_bytes"] / n_gpus + root_gathered + prefetch_units * row["layer_weight_bytes"] + non_weight


RECIPE_DIR = os.path.join(REPO, "recipes")
FSDP_LAUNCHER = os.path.join(RECIPE_DIR, "accelerate", "fsdp.yaml")  # how the fsdp recipes are launched
MEASURED_SHAPES = ("llama-2-7b", "llama-3-8b", "llama-2-70b")
SHAPE_OF_MODEL = {"llama-7b": "llama-2-7b"}  # a model alias whose shape is a measured one (the same sizes)
GPU_GB = 80  # the plan counts GPUs of this size
OVERHEAD_GOAL = 1.05  # masked / plain forward+backward (issue 18)


def large_recipes(recipe_dir: str = RECIPE_DIR) -> dict[str, dict]:
    """Every search recipe whose model has a measured shape, read by the search command's own parser: its
    micro-batch cell (shape, step kind, checkpointing, batch x sequence), searched structures, fsdp and
    the processes it is launched with."""
    import glob

    import yaml

    from dms_llm.runs.options import make
    from dms_llm.runs.search import SearchConfig, load_recipe

    found = {}
    for path in sorted(glob.glob(os.path.join(recipe_dir, "*.yaml"))):
        values = load_recipe(path)
        shape = SHAPE_OF_MODEL.get(values.get("model"), values.get("model"))
        if shape not in MEASURED_SHAPES:
            continue
        cfg = make(SearchConfig, {**values, "output_dir": "unused"})
        method, run = cfg.method(), cfg.run_settings()
        kind = next((k for k, v in KINDS.items() if v == (method.train_weights, method.distill)), None)
        if kind is None:
            raise ValueError(f"{path}: no measured step kind has train-weights {method.train_weights} and distill {method.distill}")
        processes = 1
        if run.fsdp:
            with open(FSDP_LAUNCHER) as f:
                processes = int(yaml.safe_load(f)["num_processes"])
        name = os.path.basename(path)[: -len(".yaml")]
        found[name] = {"path": path, "cell": make_cell(shape, kind, run.gradient_checkpointing, run.batch_size, cfg.seq_len, 0),
                       "structures": ",".join(method.structures), "fsdp": run.fsdp, "processes": processes,
                       "mixed_precision": run.mixed_precision}
    return found


def recipe_plan(rows: list[dict], recipes: dict[str, dict] | None = None) -> list[dict]:
    """Per large recipe: the extrapolated live tensors of its micro-batch step at full depth, the GPU memory
    unsharded, per GPU as launched (fsdp: sharded over its processes), and the fewest GPUs of GPU_GB that
    hold it (sharded over 2 to 8 only where the recipe can shard: frozen weights)."""
    recipes = large_recipes() if recipes is None else recipes
    by_group = {r["group"]: r for r in rows}
    plans = []
    for name, recipe in recipes.items():
        row = by_group.get(group_key(recipe["cell"]))
        if row is None:
            continue
        need = gpu_bytes(row["full_peak_bytes"])
        launched = recipe["processes"]
        per_gpu = gpu_bytes(fsdp_per_gpu_bytes(row, launched)) if recipe["fsdp"] and launched > 1 else need
        fewest = 1 if need <= GPU_GB * 1e9 else None
        if fewest is None and KINDS[recipe["cell"]["kind"]][0] == "none":
            fewest = next((n for n in range(2, 9) if gpu_bytes(fsdp_per_gpu_bytes(row, n)) <= GPU_GB * 1e9), None)
        plans.append({"recipe": name, "group": row["group"], "structures": recipe["structures"], "fsdp": recipe["fsdp"],
                      "live_bytes": row["full_peak_bytes"], "gpu_bytes": need, "single_gpu_gb": smallest_gpu(need),
                      "processes": launched, "per_gpu_bytes": per_gpu, "fewest_gpus": fewest,
                      "fewest_per_gpu_bytes": None if fewest is None else
                      (need if fewest == 1 else gpu_bytes(fsdp_per_gpu_bytes(row, fewest))),
                      "full_step_s": row["full_step_s"]})
    return plans


def recipe_header(plan: dict) -> str:
    """The GPU lines of a recipe's header comment, from its plan."""
    gb = lambda x: f"{x / 1e9:.0f} GB"  # noqa: E731
    tokens = plan["group"].split("/")[-1][1:]
    head = (f"# GPU memory: {gb(plan['gpu_bytes'])}{' unsharded' if plan['fsdp'] else ''} ({tokens}-token micro-batch; "
            f"extrapolated from CPU measurements, eval/bench_memory.py, docs/RESULTS.md)")
    if plan["fsdp"]:
        fewest = f"no number up to 8 of {GPU_GB} GB GPUs holds it" if plan["fewest_gpus"] is None else (
            f"it needs at least {plan['fewest_gpus']} GPUs of {GPU_GB} GB ({gb(plan['fewest_per_gpu_bytes'])} each)")
        return (f"{head}:\n# sharded over the {plan['processes']} processes launched here {gb(plan['per_gpu_bytes'])} per GPU; "
                f"{fewest}.")
    if plan["single_gpu_gb"] is None:
        return f"{head}:\n# more than any single GPU holds; this recipe cannot shard (fsdp needs frozen weights)."
    return f"{head}:\n# one GPU of {plan['single_gpu_gb']} GB or more (1 x {GPU_GB} GB)."


def _gib(x) -> str:
    return f"{x / GIB:.2f}"


def _tokens(c) -> str:
    return f"{c['batch']}x{c['seq']}"


# Cells measured before cells recorded their commit ran the library of this commit (branch membench, bench
# code f83704d..be72a86); the port to the issue-16 layout measures the same step (four cells measured
# again: docs/RESULTS.md, section 9).
LEGACY_LIBRARY_COMMIT = "1568d61"


def report(data: dict, recipes: dict[str, dict] | None = None) -> str:
    cells = {k: c for k, c in data["cells"].items() if "error" not in c}
    out = []
    if cells:
        commits = sorted({c.get("library_commit") or LEGACY_LIBRARY_COMMIT for c in cells.values()})
        dates = sorted(c["measured_at"] for c in cells.values() if c.get("measured_at"))
        out.append(f"Measured cells ({len(cells)}; dms_llm at {', '.join(commits)}"
                   + (f"; {dates[0]} to {dates[-1]}" if dates else "") + "). CPU, bf16 weights + bf16 autocast, one "
                   "torch thread; peak = resident set above the process's start (the live tensors); step = median after "
                   "one warm-up step, fastest of the timing runs by CPU time:\n")
        out.append("| shape | step kind | ckpt | tokens | layers | peak GiB | weights GiB | saved act. GiB | step CPU s | step wall s | "
                   "GFLOP/CPU s | load1 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in sorted(cells.values(), key=lambda c: (c["shape"], c["kind"], c["ckpt"], c["batch"] * c["seq"], c["batch"], c["depth"])):
            saved = "" if c.get("saved_activation_bytes") is None else _gib(c["saved_activation_bytes"])
            loads = c.get("best_load1") or c["load1_before_step"]
            cpu = c.get("step_cpu_s")
            cpu_text, rate = ("-", "-") if cpu is None else (f"{cpu:.1f}", f"{c['flops'] / cpu / 1e9:.0f}")
            out.append(f"| {c['shape']} | {c['kind']} | {'on' if c['ckpt'] else 'off'} | {_tokens(c)} | {c['depth']} | "
                       f"{_gib(c['peak_bytes'])} | {_gib(c['weight_bytes'])} | {saved} | {cpu_text} | {c['step_s']:.1f} | "
                       f"{rate} | {'/'.join(str(x) for x in loads)} |")
    for c in data["cells"].values():
        if "error" in c:
            out.append(f"\nFAILED {cell_key(c)}: {c['error']}")
    rows = extrapolations(data["cells"])
    if rows:
        out.append("\nPer-layer fits (memory = a + b*L, time = c + d*L on the two smallest depths; time in CPU seconds of "
                   "the one thread where measured, else wall), their check at a further depth, and the full model:\n")
        out.append("| shape | step kind | ckpt | tokens | a GiB | b GiB/layer | of b: activations | check: predicted / measured peak | "
                   "c s | d s/layer | check: predicted / measured step | full depth | peak at full depth GiB | step at full depth (this CPU) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mem_check = "; ".join(f"L{k['depth']}: {_gib(k['predicted_peak_bytes'])} / {_gib(k['peak_bytes'])} ({k['peak_error']:+.1%})"
                                  for k in r["checks"]) or "-"
            time_check = "; ".join(f"L{k['depth']}: {k['predicted_step_s']:.1f} / {k['step_s']:.1f} s ({k['time_error']:+.1%})"
                                   for k in r["checks"]) or "-"
            out.append(f"| {r['shape']} | {r['kind']} | {'on' if r['ckpt'] else 'off'} | {_tokens(r)} | {_gib(r['mem_a'])} | "
                       f"{_gib(r['mem_b'])} | {_gib(r['activation_bytes_per_layer'])} | {mem_check} | {r['time_c']:.1f} | "
                       f"{r['time_d']:.1f} | {time_check} | {r['full_depth']} | **{_gib(r['full_peak_bytes'])}** | "
                       f"{r['full_step_s'] / 60:.1f} min |")
        checked = [(r, k) for r in rows for k in r["checks"]]
        if checked:
            out.append("\nExtrapolation check (fit on the two smallest depths, predicted vs measured at a further depth; "
                       "the miss read as an error of the per-layer slope and carried on to the full depth):\n")
            out.append("| group | fit on | checked at | peak error | carried to full depth | step error | carried to full depth |")
            out.append("|---|---|---|---|---|---|---|")
            for r, k in checked:
                out.append(f"| {r['group']} | L{r['fit_depths'][0]}, L{r['fit_depths'][1]} | L{k['depth']} | {k['peak_error']:+.2%} | "
                           f"{k['full_peak_error']:+.2%} at L{r['full_depth']} | {k['time_error']:+.1%} | "
                           f"{k['full_time_error']:+.1%} at L{r['full_depth']} |")
    plans = recipe_plan(rows, recipes)
    if plans:
        out.append(f"\nGPU plan per recipe (its micro-batch step at full depth; GPU memory = extrapolated peak x "
                   f"{1 + ALLOCATOR_MARGIN:.2f} + {CUDA_CONTEXT_GIB:.0f} GiB CUDA context; fsdp: per GPU the weight shard + "
                   f"2 gathered decoder layers + its own activations):\n")
        out.append(f"| recipe | searched | micro-batch cell | live tensors GiB | GPU memory GB (one GPU) | smallest single GPU | "
                   f"as launched: processes x GB each | fewest {GPU_GB} GB GPUs | one micro-batch step at full depth (this CPU) |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for p in plans:
            fewest = ("none" if p["fewest_gpus"] is None else f"{p['fewest_gpus']}" + (
                f" (fsdp, {p['fewest_per_gpu_bytes'] / 1e9:.0f} GB each)" if p["fewest_gpus"] > 1 else ""))
            out.append(f"| {p['recipe']} | {p['structures']} | {p['group']} | {_gib(p['live_bytes'])} | {p['gpu_bytes'] / 1e9:.1f} | "
                       f"{str(p['single_gpu_gb']) + ' GB' if p['single_gpu_gb'] else 'none (shard it)'} | "
                       f"{p['processes']} x {p['per_gpu_bytes'] / 1e9:.1f}{' (fsdp)' if p['fsdp'] else ''} | {fewest} | "
                       f"{p['full_step_s'] / 60:.1f} min |")
        out.append("\nThe recipes' header lines:\n")
        out += [f"    {p['recipe']}.yaml:\n" + "\n".join("    " + line for line in recipe_header(p).splitlines()) for p in plans]
    over = data.get("overhead", {})
    if over:
        out.append(f"\nMask overhead (eval/bench_overhead.py in a fresh process per row; interleaved repetitions, medians of "
                   f"CPU seconds; train = with weight gradients, frozen = activation gradients only, as the frozen search; "
                   f"goal masked/plain <= {OVERHEAD_GOAL}):\n")
        out.append("| shape | layers | tokens | reps | train: plain s | masked s | **masked/plain** | frozen: plain s | masked s | "
                   f"**masked/plain** | <= {OVERHEAD_GOAL} | spread of the reps | (wall-time ratios) | load1 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(over.values(), key=lambda r: (r.get("shape", ""), r.get("seq_len", 0), r.get("layers", 0))):
            if "error" in r:
                out.append(f"| {r.get('shape')} | {r.get('layers')} | {r.get('seq_len')} | FAILED: {r['error']} |||||||||")
                continue
            cells_, ratios = [], []
            for plain, masked, ratio in (("plain", "masked", "ratio"), ("plain_frozen", "masked_frozen", "frozen_ratio")):
                if f"{ratio}_cpu" in r:
                    cells_ += [f"{r[plain + '_cpu_s']:.2f}", f"{r[masked + '_cpu_s']:.2f}", f"**{r[ratio + '_cpu']:.3f}**"]
                    ratios.append(r[ratio + "_cpu"])
                else:
                    cells_ += ["-", "-", "-"]
            verdict = "yes" if ratios and max(ratios) <= OVERHEAD_GOAL else "no"
            walls = " / ".join(f"{r[k]:.3f}" for k in ("ratio", "frozen_ratio") if k in r)
            out.append(f"| {r['shape']} | {r['layers']} | {r['batch']}x{r['seq_len']} | {r['reps']} | " + " | ".join(cells_)
                       + f" | {verdict} | {rep_spread(r)} | {walls} | {r.get('load1_before', '')}-{r.get('load1_after', '')} |")
        lines = overhead_extrapolation(over)
        if lines:
            out.append("\nExtrapolated to full depth (the per-layer ratio is a difference of two timings at 1 and 2 layers, "
                       "so it carries their noise, the spread of the reps above, several times over):\n")
            out += lines
    return "\n".join(out) + "\n"


def rep_spread(r: dict) -> str:
    """The largest (max - min) / median of a row's repeated CPU timings: the noise its ratios carry."""
    spreads = [(max(ts) - min(ts)) / statistics.median(ts) for ts in (r.get("cpu_times_s") or {}).values() if ts]
    return f"{max(spreads):.1%}" if spreads else "-"


def overhead_extrapolation(over: dict) -> list[str]:
    """Masked/plain at full depth from two depths: CPU time t(L) = c + d*L for each variant, ratio of the
    full-depth times; also d_masked / d_plain, the ratio per decoder layer."""
    groups: dict[tuple, list[dict]] = {}
    for r in over.values():
        if "error" not in r:
            groups.setdefault((r["shape"], r["batch"], r["seq_len"]), []).append(r)
    lines = []
    for (shape, batch, seq), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["layers"])
        if len(rs) < 2:
            continue
        full = shape_facts(shape)["layers"]
        parts = []
        for plain, masked, name in (("plain_cpu_s", "masked_cpu_s", "train"), ("plain_frozen_cpu_s", "masked_frozen_cpu_s", "frozen")):
            if all(plain in r and masked in r for r in rs[:2]):
                xs = [r["layers"] for r in rs[:2]]
                cp, dp = fit_linear(xs, [r[plain] for r in rs[:2]])
                cm, dm = fit_linear(xs, [r[masked] for r in rs[:2]])
                parts.append(f"{name} {(cm + dm * full) / (cp + dp * full):.3f} (per layer {dm / dp:.3f})")
        if parts:
            lines.append(f"- {shape}, {batch}x{seq} tokens, extrapolated to {full} layers from {rs[0]['layers']} and "
                         f"{rs[1]['layers']}: masked/plain " + ", ".join(parts))
    return lines


# ----- mask overhead at these shapes --------------------------------------------------------------
def overhead_key(shape, batch, seq, layers) -> str:
    return f"{shape}/b{batch}x{seq}/L{layers}"


def measure_overhead(payload: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from bench_overhead import bench

    before = load1()
    row = bench(None, "bfloat16", payload["batch"], payload["seq"], payload["reps"], STRUCTURES, "cpu",
                payload["shape"], payload["layers"], tuple(payload["variants"]))
    return {**row, "shape": payload["shape"], "load1_before": before, "load1_after": load1(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_overhead(shapes, seqs, depths, reps, variants, path, refresh, timeout, batch=1) -> dict:
    data = load_results(path)
    todo = [(s, q, d) for s, q, d in itertools.product(shapes, seqs, depths)
            if refresh or overhead_key(s, batch, q, d) not in data["overhead"]]
    todo.sort(key=lambda t: step_flops(t[0], "frozen", False, batch, t[1], t[2]))
    print(f"{len(todo)} overhead rows to measure; results: {path}", flush=True)
    for n, (shape, seq, depth) in enumerate(todo, 1):
        key = overhead_key(shape, batch, seq, depth)
        start = time.time()
        payload = {"shape": shape, "batch": batch, "seq": seq, "layers": depth, "reps": reps, "variants": list(variants)}
        result = run_in_subprocess("overhead", payload, timeout)
        data = load_results(path)
        data["overhead"][key] = result if "error" not in result else {"shape": shape, "seq_len": seq, "layers": depth, **result}
        save_results(data, path)
        if "error" in result:
            print(f"[{n}/{len(todo)}] {key}: FAILED {result['error']}", flush=True)
        else:
            print(f"[{n}/{len(todo)}] {key}: masked/plain {result.get('ratio')} (train), {result.get('frozen_ratio')} (frozen); "
                  f"{time.time() - start:.0f} s wall, load {result['load1_before']}-{result['load1_after']}", flush=True)
    return data


# ----- command line -------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # one cell in this fresh process; the result goes to stdout
        kind, payload = argv[1], json.loads(argv[2])
        result = measure_cell(payload["cell"], payload["steps"]) if kind == "cell" else measure_overhead(payload)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure memory/time cells (missing ones only, unless --refresh-time)")
    run.add_argument("--shapes", default=None, help="named shapes (eval/configs) or config.json paths; with --kinds etc. "
                                                    "a grid replaces the default one")
    run.add_argument("--kinds", default="frozen,lora_distill")
    run.add_argument("--ckpt", default="off,on", help="gradient checkpointing: off, on or off,on")
    run.add_argument("--seq-lens", default="512,2048")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--depths", default="1,2")
    run.add_argument("--steps", type=int, default=2, help="search steps per cell; the first is a warm-up (default 2)")
    run.add_argument("--refresh-time", action="store_true", help="re-measure cells already in the cache (keeps all timings)")
    run.add_argument("--retry-errors", action="store_true")
    run.add_argument("--dry-run", action="store_true", help="list the cells that would run, cheapest first")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    run.add_argument("--results", default=DEFAULT_RESULTS)
    ov = sub.add_parser("overhead", help="mask overhead (bench_overhead) at these shapes, one process per row")
    ov.add_argument("--shapes", default="llama-2-7b,llama-3-8b")
    ov.add_argument("--seq-lens", default="512,2048")
    ov.add_argument("--depths", default="1,2")
    ov.add_argument("--reps", type=int, default=5)
    ov.add_argument("--variants", default="train,frozen")
    ov.add_argument("--refresh", action="store_true")
    ov.add_argument("--timeout", type=float, default=7200.0)
    ov.add_argument("--results", default=DEFAULT_RESULTS)
    rep = sub.add_parser("report", help="print the tables (Markdown) from the results cache")
    rep.add_argument("--results", default=DEFAULT_RESULTS)
    rep.add_argument("--output", default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)

    if args.command == "run":
        if args.shapes:
            ckpts = {"off": False, "on": True}
            cells = [make_cell(s, k, ckpts[c], args.batch, q, d)
                     for s, k, c, q, d in itertools.product(_names(args.shapes), _names(args.kinds), _names(args.ckpt),
                                                            _ints(args.seq_lens), _ints(args.depths))]
        else:
            cells = default_grid()
        for c in cells:
            shape_path(c["shape"])
        run_cells(cells, args.results, args.steps, args.refresh_time, args.timeout, args.dry_run, args.retry_errors)
    elif args.command == "overhead":
        run_overhead(_names(args.shapes), _ints(args.seq_lens), _ints(args.depths), args.reps, _names(args.variants),
                     args.results, args.refresh, args.timeout)
    else:
        text = report(load_results(args.results))
        print(text)
        if args.output:
            from dms_llm.files import write_text_atomic

            write_text_atomic(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
