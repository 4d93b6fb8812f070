"""Prefill and greedy-decode speed of pruned checkpoints relative to their dense model.

    python eval/bench_speed.py --pruned outputs/smollm2-80-frozen,outputs/smollm2-50-lora
    python eval/bench_speed.py --synthetic 0.8,0.5          # shapes only: uniformly shrunk plans

Runs are interleaved (dense, pruned, dense, ...) and medians reported, per dtype. Prefill is one
forward over [batch, seq_len]; decode is greedy single-token steps with the KV cache at batch 1. The
goal (pruning issue): prefill speed-up >= 0.8 x (dense params / pruned params). For decode it also
profiles one run and prints where the time goes (matrix products, attention, the rest, and the Python
and dispatch overhead that the operator timings do not cover).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def synthetic_pruned(model, ratio: float):
    """A plan at `ratio` from uniformly scaled kept ratios (real shapes, arbitrary indices)."""
    import torch

    from dms_llm import ModelMasks, ParameterCounter
    from dms_llm.prune import prune_model
    from dms_llm.budget import fit_to_budget

    masks = ModelMasks(model.config, structures="heads,channels,hidden")
    counter = ParameterCounter(model)
    g = torch.Generator().manual_seed(0)
    for _, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
    fit_to_budget(masks, counter, int(ratio * counter.dense()))
    return prune_model(model, masks.to_plan(model.config))


def decode_profile(model, prompt_len: int, new_tokens: int) -> dict:
    """Share of decode wall time per operator family, from one profiled run."""
    import torch

    from dms_llm.evaluation.speed import time_decode

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        time_decode(model, prompt_len, new_tokens)
        wall = time.perf_counter() - start
    families = {"matmul": ("addmm", "mm", "matmul", "linear", "bmm"), "attention": ("attention", "softmax")}
    totals = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        name = event.key[len("aten::"):]
        self_s = event.self_cpu_time_total / 1e6
        family = next((f for f, keys in families.items() if any(k == name or k in name for k in keys)), "other ops")
        totals[family] += self_s
    totals["python/dispatch overhead"] = max(0.0, wall - sum(totals.values()))
    return {k: round(v / wall, 3) for k, v in totals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense model (default: embedded SmolLM2-135M)")
    parser.add_argument("--pruned", default="", help="comma list of saved pruned checkpoints")
    parser.add_argument("--synthetic", default="", help="comma list of parameter ratios for shape-only plans")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    from dms_llm.checkpoints import count_parameters, load_model_and_tokenizer
    from dms_llm.evaluation.speed import relative_speed

    results = []
    for dtype in args.dtypes.split(","):
        dense, _ = load_model_and_tokenizer(args.model, dtype=dtype)
        models = {"dense": dense}
        for path in [p for p in args.pruned.split(",") if p]:
            models[os.path.basename(os.path.normpath(path))] = load_model_and_tokenizer(path, dtype=dtype)[0]
        for ratio in [float(r) for r in args.synthetic.split(",") if r]:
            models[f"synthetic-{ratio:g}"] = synthetic_pruned(dense, ratio).to(getattr(torch, dtype))
        speed = relative_speed(models, reference="dense", reps=args.reps, batch=args.batch, seq_len=args.seq_len,
                               new_tokens=args.new_tokens)
        dense_params = count_parameters(dense)
        for name, model in models.items():
            params = count_parameters(model)
            s = speed["models"][name]
            results.append({
                "model": name, "dtype": dtype, "params": params, "param_ratio": params / dense_params,
                "layers": sum(1 for _ in model.model.layers), **{k: round(v, 3) for k, v in s.items()},
                "prefill_goal": round(0.8 * dense_params / params, 3),
                "decode_time_share": decode_profile(model, 32, args.new_tokens),
            })
    print(f"threads={torch.get_num_threads()} batch={args.batch} seq_len={args.seq_len} new_tokens={args.new_tokens} reps={args.reps}")
    print(f"{'model':26s} {'dtype':9s} {'params':>7s} {'layers':>6s} {'prefill tok/s':>13s} {'speedup':>8s} {'goal':>6s} "
          f"{'decode tok/s':>12s} {'speedup':>8s}  decode time share")
    for r in results:
        print(f"{r['model']:26s} {r['dtype']:9s} {r['param_ratio']:7.1%} {r['layers']:6d} {r['prefill_tokens_per_s']:13.1f} "
              f"{r['prefill_speedup']:8.2f} {r['prefill_goal']:6.2f} {r['decode_tokens_per_s']:12.1f} {r['decode_speedup']:8.2f}  "
              + ", ".join(f"{k} {v:.0%}" for k, v in r["decode_time_share"].items()))
    if args.output:
        from dms_llm.files import write_json_atomic

        write_json_atomic(args.output, {"settings": vars(args), "threads": torch.get_num_threads(), "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
