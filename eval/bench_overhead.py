"""Overhead of the DMS masks: forward+backward of a masked model vs the plain model, same inputs.

    python eval/bench_overhead.py                      # SmolLM2-135M, batch 1 x 256, fp32 and bf16
    python eval/bench_overhead.py --seq-len 512 --reps 5 --dtypes bfloat16
    python eval/bench_overhead.py --shape eval/configs/llama-7b.json --dtypes bfloat16 --seq-len 2048   # GPU, 7B shape

Runs are interleaved (plain, masked, search, plain, ...) so machine noise hits all alike; the median of
each is reported with the ratios to plain. The masked model has all four structures searched, soft
masks with non-uniform importances (the search's real path, not the all-ones cold start). "search" is
one complete search step with frozen weights (masked forward+backward, budget loss, importance update,
optimiser step), the unit the search's throughput is made of; "plain" is a training step of the
unmasked model (forward+backward with weight gradients).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _sync(device) -> None:
    import torch

    if device.type == "cuda":  # CUDA runs asynchronously: time the finished work, not the queued launches
        torch.cuda.synchronize(device)


def time_step(model, ids, masks=None) -> float:
    _sync(ids.device)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if masks is not None:
        masks.update_importance()
    _sync(ids.device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    if masks is not None:
        masks.zero_grad(set_to_none=True)
    return elapsed


def load(model_name, shape, dtype, device):
    """The named model, or a randomly initialised one of a config.json's shape (timing needs shapes only)."""
    import torch

    if shape:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(shape)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    from dms_llm.checkpoints import load_model_and_tokenizer

    return load_model_and_tokenizer(model_name, dtype=dtype, device=device)[0]


def bench(model_name, dtype, batch, seq_len, reps, structures, device="cpu", shape=None):
    import torch

    from dms_llm import MaskHooks, ModelMasks

    device = torch.device(device)
    model = load(model_name, shape, dtype, device)
    model.requires_grad_(True)  # a training step: weights get gradients in both variants
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    masks = ModelMasks(model.config, structures=structures).to(device)
    g = torch.Generator().manual_seed(1)
    for _, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        topk.ratio.data.fill_(0.8)
    hooks = MaskHooks(model, masks)
    search = search_step_timer(model, masks, ids)
    plain, masked, searched = [], [], []
    time_step(model, ids)  # warm-up every path
    with hooks:
        time_step(model, ids, masks)
        search()
    for _ in range(reps):
        plain.append(time_step(model, ids))
        with hooks:
            masked.append(time_step(model, ids, masks))
            searched.append(search())
    p, m, s = (statistics.median(x) for x in (plain, masked, searched))
    return {"dtype": dtype, "batch": batch, "seq_len": seq_len, "reps": reps, "plain_s": round(p, 4),
            "masked_s": round(m, 4), "ratio": round(m / p, 4), "search_step_s": round(s, 4),
            "search_throughput_ratio": round(p / s, 4), "hooks": len(hooks.targets), "device": str(device),
            "shape": shape}


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

    def run() -> float:
        model.requires_grad_(False)
        _sync(ids.device)
        start = time.perf_counter()
        loop.step(next(steps))
        _sync(ids.device)
        elapsed = time.perf_counter() - start
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        return elapsed

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M)")
    parser.add_argument("--shape", default=None, help="a config.json: time a randomly initialised model of that shape "
                                                      "instead of --model (e.g. eval/configs/llama-7b.json on a GPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--structures", default="heads,channels,hidden,layers")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = [bench(args.model, d, args.batch, args.seq_len, args.reps, args.structures, device, args.shape)
            for d in args.dtypes.split(",")]
    name = args.shape or args.model or "smollm2-135m"
    print(f"device={device} threads={torch.get_num_threads()} model={name} structures={args.structures}")
    print(f"{'dtype':10s} {'batch x len':>12s} {'plain s':>9s} {'masked s':>9s} {'masked/plain':>13s} {'search s':>9s} {'search tok/s / plain':>21s}")
    for r in rows:
        print(f"{r['dtype']:10s} {str(r['batch']) + ' x ' + str(r['seq_len']):>12s} {r['plain_s']:9.3f} {r['masked_s']:9.3f} "
              f"{r['ratio']:13.3f} {r['search_step_s']:9.3f} {r['search_throughput_ratio']:21.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
