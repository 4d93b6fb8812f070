"""Overhead of the DMS masks: forward+backward of a masked model vs the plain model, same inputs.

    python eval/bench_overhead.py                      # SmolLM2-135M, batch 1 x 256, fp32 and bf16
    python eval/bench_overhead.py --seq-len 512 --reps 5 --dtypes bfloat16
    python eval/bench_overhead.py --shape eval/configs/llama-7b.json --dtypes bfloat16 --seq-len 2048   # GPU, 7B shape
    python eval/bench_overhead.py --shape llama-2-7b --layers 2 --dtypes bfloat16 --seq-len 512 --variants train,frozen

Runs are interleaved (plain, masked, search, plain, ...) so machine noise hits all alike; the median of
each is reported with the ratios to plain. The masked model has all four structures searched, soft
masks with non-uniform importances (the search's real path, not the all-ones cold start).
`--variants` picks what is timed:
  train   "plain" is a training step of the unmasked model (forward+backward with weight gradients),
          "masked" the same with the masks (+ the importance update); ratio = masked / plain
  frozen  the same pair without weight gradients, as the frozen search computes them: the backward
          runs through every layer to the embedding output (plain) or to the masks (masked);
          frozen_ratio = masked_frozen / plain_frozen
  search  one complete search step with frozen weights (masked forward+backward, budget loss,
          importance update, optimiser step), the unit the search's throughput is made of;
          search_throughput_ratio = plain / search
`--shape` takes a config.json or a named shape of eval/configs (llama-2-7b, llama-3-8b, llama-2-70b,
llama-7b); `--layers N` builds that shape with N decoder layers (random weights: timing needs shapes only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _sync(device) -> None:
    import torch

    if device.type == "cuda":  # CUDA runs asynchronously: time the finished work, not the queued launches
        torch.cuda.synchronize(device)


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds. One torch thread on a shared CPU: the process's CPU time leaves out the time it
    waited for a core, so it stays meaningful where other jobs load the machine."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def time_step(model, ids, masks=None) -> tuple[float, float]:
    _sync(ids.device)
    start = _clock()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if masks is not None:
        masks.update_importance()
    _sync(ids.device)
    elapsed = _since(start)
    model.zero_grad(set_to_none=True)
    if masks is not None:
        masks.zero_grad(set_to_none=True)
    return elapsed


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shape_path(shape: str) -> str:
    """A config.json path, or a named shape of eval/configs (llama-2-7b, llama-3-8b, llama-2-70b, ...)."""
    if os.path.exists(shape):
        return shape
    named = os.path.join(CONFIG_DIR, f"{shape}.json")
    if os.path.exists(named):
        return named
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    raise SystemExit(f"error: no config file {shape!r} and no named shape of that name (known: {', '.join(known)})")


def shape_config(shape: str, layers: int | None = None):
    """The config of a shape, optionally with `layers` decoder layers instead of its own number."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(shape_path(shape))
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def load(model_name, shape, dtype, device, layers=None):
    """The named model, or a randomly initialised one of a config.json's shape (timing needs shapes only)."""
    import torch

    if shape:
        from transformers import AutoModelForCausalLM

        config = shape_config(shape, layers)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    from dms_llm.checkpoints import load_model_and_tokenizer

    return load_model_and_tokenizer(model_name, dtype=dtype, device=device)[0]


VARIANTS = ("train", "frozen", "search")


def search_masks(config, method, ratio: float, seed: int = 1):
    """The masks the search builds (`ModelMasks.for_method`) for `method` (a `DMSConfig`, or the structures
    searched with the default one), with kept ratio `ratio` and random, distinct importances: the soft-mask
    path of a search under way, not the all-ones cold start."""
    import torch

    from dms_llm import DMSConfig, ModelMasks
    from dms_llm.method import parse_structures

    masks = ModelMasks.for_method(config, DMSConfig(structures=parse_structures(method)) if isinstance(method, str) else method)
    g = torch.Generator().manual_seed(seed)
    for _, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        topk.ratio.data.fill_(ratio)
    return masks


def masked_model(model_name, shape, dtype, device, layers, batch, seq_len, structures):
    """(model, input ids, masks at kept ratio 0.8, their `MaskHooks`, not installed) of one timing run."""
    import torch

    from dms_llm import MaskHooks

    model = load(model_name, shape, dtype, device, layers)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    masks = search_masks(model.config, structures, 0.8).to(device)
    return model, ids, masks, MaskHooks(model, masks)


def frozen_step_timer(model, ids, masks=None):
    """A callable timing forward+backward without weight gradients (the frozen search's backward).

    Plain: the embedding output is made to require a gradient, so the backward runs through every
    layer (activation gradients only). Masked (`masks` given, hooks installed by the caller): the
    gradient reaches the masks, which the embedding output is multiplied by."""
    embed = model.get_input_embeddings()

    def require_grad(module, args, output):
        return output.requires_grad_()

    def run() -> tuple[float, float]:
        saved = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        handle = embed.register_forward_hook(require_grad) if masks is None else None
        try:
            return time_step(model, ids, masks)
        finally:
            if handle is not None:
                handle.remove()
            for n, p in model.named_parameters():
                p.requires_grad_(saved[n])

    return run


def bench(model_name, dtype, batch, seq_len, reps, structures, device="cpu", shape=None, layers=None,
          variants=("train", "search")):
    import torch

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"error: unknown variant(s) {unknown or list(variants)}; choose from {','.join(VARIANTS)}")
    device = torch.device(device)
    model, ids, masks, hooks = masked_model(model_name, shape, dtype, device, layers, batch, seq_len, structures)
    model.requires_grad_(True)  # a training step: weights get gradients in both variants

    def masked(timer):
        def run():
            with hooks:
                return timer()
        return run

    runs = {}
    if "train" in variants:
        runs["plain"] = lambda: time_step(model, ids)
        runs["masked"] = masked(lambda: time_step(model, ids, masks))
    if "frozen" in variants:
        runs["plain_frozen"] = frozen_step_timer(model, ids)
        runs["masked_frozen"] = masked(frozen_step_timer(model, ids, masks))
    if "search" in variants:
        runs["search"] = masked(search_step_timer(model, masks, ids))
    for run in runs.values():  # warm-up every path
        run()
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    med = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    row = {"dtype": dtype, "batch": batch, "seq_len": seq_len, "reps": reps}
    pairs = {"train": ("plain", "masked", "ratio"), "frozen": ("plain_frozen", "masked_frozen", "frozen_ratio")}
    for variant, (plain, masked_name, ratio) in pairs.items():
        if variant in variants:
            row.update({f"{plain}_s": round(med[plain], 4), f"{masked_name}_s": round(med[masked_name], 4),
                        ratio: round(med[masked_name] / med[plain], 4)})
            if device.type == "cpu":  # CPU time: the same ratio without the waits for a busy core
                row.update({f"{plain}_cpu_s": round(cpu[plain], 4), f"{masked_name}_cpu_s": round(cpu[masked_name], 4),
                            f"{ratio}_cpu": round(cpu[masked_name] / cpu[plain], 4)})
    if "search" in variants:
        row["search_step_s"] = round(med["search"], 4)
        if "train" in variants:
            row["search_throughput_ratio"] = round(med["plain"] / med["search"], 4)
    row.update(hooks=len(hooks.targets), device=str(device), shape=shape, layers=model.config.num_hidden_layers,
               times_s={name: [round(w, 4) for w, _ in ts] for name, ts in times.items()})
    if device.type == "cpu":
        row["cpu_times_s"] = {name: [round(c, 4) for _, c in ts] for name, ts in times.items()}
    return row


def profile(model_name, dtype, batch, seq_len, structures, device="cpu", shape=None, layers=None, variant="frozen",
            top=15) -> dict:
    """Where the masked step's extra time goes: torch.profiler on one plain and one masked step (after a
    warm-up of each), per operator self time, sorted by masked - plain."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(device)
    model, ids, masks, hooks = masked_model(model_name, shape, dtype, device, layers, batch, seq_len, structures)
    model.requires_grad_(variant == "train")
    if variant == "train":
        plain, masked_step = (lambda: time_step(model, ids)), (lambda: time_step(model, ids, masks))
    else:
        plain, masked_step = frozen_step_timer(model, ids), frozen_step_timer(model, ids, masks)

    def masked():
        with hooks:
            return masked_step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables, totals = {}, {}
    for name, run in (("plain", plain), ("masked", masked)):
        run()  # warm-up
        with torch_profile(activities=activities) as prof:
            totals[name] = run()[0]
        tables[name] = {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()}
    ops = sorted(set(tables["plain"]) | set(tables["masked"]),
                 key=lambda k: tables["masked"].get(k, (0, 0.0))[1] - tables["plain"].get(k, (0, 0.0))[1], reverse=True)
    rows = [{"op": k, "plain_calls": tables["plain"].get(k, (0, 0))[0], "masked_calls": tables["masked"].get(k, (0, 0))[0],
             "plain_s": round(tables["plain"].get(k, (0, 0.0))[1], 4), "masked_s": round(tables["masked"].get(k, (0, 0.0))[1], 4),
             "extra_s": round(tables["masked"].get(k, (0, 0.0))[1] - tables["plain"].get(k, (0, 0.0))[1], 4)} for k in ops]
    return {"variant": variant, "dtype": dtype, "batch": batch, "seq_len": seq_len, "shape": shape,
            "layers": model.config.num_hidden_layers, "plain_step_s": round(totals["plain"], 4),
            "masked_step_s": round(totals["masked"], 4), "ratio": round(totals["masked"] / totals["plain"], 4),
            "top_extra": rows[:top], "matmul_s": {name: round(sum(t for k, (_, t) in tables[name].items()
                                                                  if k in ("aten::mm", "aten::addmm", "aten::bmm")), 4)
                                                  for name in tables}}


def search_step_timer(model, masks, ids):
    """A callable timing one `SearchLoop.step` on `ids` (frozen weights, as the default search)."""
    from dms_llm import DMSConfig
    from dms_llm.budget import ParameterCounter
    from dms_llm.training.dms import SearchLoop, SearchModule
    from dms_llm.training.engine import Engine, RunSettings

    counter = ParameterCounter(model)
    engine = Engine(RunSettings(batch_size=ids.shape[0]), verbose=False)
    loop = SearchLoop(engine, SearchModule(model, masks), masks, counter, ids, DMSConfig(steps=10**6),
                      int(0.8 * counter.dense()), teacher=None, weight_params=[])
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    steps = iter(range(10**6))

    def run() -> tuple[float, float]:
        model.requires_grad_(False)
        _sync(ids.device)
        start = _clock()
        loop.step(next(steps))
        _sync(ids.device)
        elapsed = _since(start)
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        return elapsed

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M)")
    parser.add_argument("--shape", default=None, help="a config.json or a named shape of eval/configs (llama-2-7b, llama-3-8b, "
                                                      "llama-2-70b): time a randomly initialised model of that shape instead of --model")
    parser.add_argument("--layers", type=int, default=None, help="with --shape: this many decoder layers instead of the shape's")
    parser.add_argument("--variants", default="train,search", help="what to time: train, frozen, search (comma list)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--structures", default="heads,channels,hidden,layers")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--profile", default=None, choices=("train", "frozen"),
                        help="instead of timing: profile one plain and one masked step of this variant (first dtype) "
                             "and list the operators that take the extra time")
    args = parser.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.layers is not None and not args.shape:
        parser.error("--layers needs --shape")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.profile:
        result = profile(args.model, args.dtypes.split(",")[0], args.batch, args.seq_len, args.structures, device,
                         args.shape, args.layers, args.profile)
        print(f"{args.profile} step, {result['layers']} layers, {args.batch} x {args.seq_len}: plain {result['plain_step_s']:.3f} s, "
              f"masked {result['masked_step_s']:.3f} s ({result['ratio']:.3f}x, under the profiler); "
              f"matrix products {result['matmul_s']['plain']:.3f} s / {result['matmul_s']['masked']:.3f} s")
        print(f"{'operator':40s} {'calls plain':>11s} {'calls masked':>12s} {'plain s':>9s} {'masked s':>9s} {'extra s':>9s}")
        for r in result["top_extra"]:
            print(f"{r['op'][:40]:40s} {r['plain_calls']:11d} {r['masked_calls']:12d} {r['plain_s']:9.3f} {r['masked_s']:9.3f} "
                  f"{r['extra_s']:9.3f}")
        if args.output:
            from dms_llm.files import write_json_atomic

            write_json_atomic(args.output, result)
        return 0
    rows = [bench(args.model, d, args.batch, args.seq_len, args.reps, args.structures, device, args.shape, args.layers,
                  variants) for d in args.dtypes.split(",")]
    name = args.shape or args.model or "smollm2-135m"
    if args.layers is not None:
        name += f" ({args.layers} layers)"
    print(f"device={device} threads={torch.get_num_threads()} model={name} structures={args.structures}")
    columns = [("plain s", "plain_s"), ("masked s", "masked_s"), ("masked/plain", "ratio"), ("(CPU time)", "ratio_cpu"),
               ("plain frozen s", "plain_frozen_s"), ("masked frozen s", "masked_frozen_s"), ("frozen ratio", "frozen_ratio"),
               ("(CPU time)", "frozen_ratio_cpu"),
               ("search s", "search_step_s"), ("search tok/s / plain", "search_throughput_ratio")]
    columns = [(title, key) for title, key in columns if key in rows[0]]
    print(f"{'dtype':10s} {'batch x len':>12s}" + "".join(f" {title:>{max(9, len(title))}s}" for title, _ in columns))
    for r in rows:
        print(f"{r['dtype']:10s} {str(r['batch']) + ' x ' + str(r['seq_len']):>12s}"
              + "".join(f" {r[key]:>{max(9, len(title))}.3f}" for title, key in columns))
    if args.output:
        from dms_llm.files import write_json_atomic

        write_json_atomic(args.output, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
