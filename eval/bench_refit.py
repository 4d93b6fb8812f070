"""How much the kept inputs save the refit: the same refit of one plan timed both ways, interleaved.

    OMP_NUM_THREADS=1 python eval/bench_refit.py --plan runs/dms80/dms_plan.json --blocks 32 --reps 3

The refit carries the residual stream past each sublayer either by its refit projection applied to the
kept columns of the source's input to it (held in memory up to `dms_llm.refit.KEPT_INPUTS_MAX_BYTES`) or by
a pass of the pruned sublayer (above that). Both run on SmolLM2-135M (the source of the plan) and the
first BLOCKS calibration blocks of the default C4 train sample, repetition by repetition; the times are
process CPU seconds (on shared cores, wall time measures the neighbours) and the ratio is of their medians.
The two refit models' logits on other blocks are compared, so a faster but different refit shows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dms_llm.refit as refit
from dms_llm.checkpoints import load_model_and_tokenizer
from dms_llm.data import load_calibration
from dms_llm.plan import PrunePlan
from dms_llm.prune import prune_model
from dms_llm.runs.options import data_dir_default

WAYS = {"kept inputs": 1 << 62, "pruned pass": 0}  # KEPT_INPUTS_MAX_BYTES for each


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="a dms_plan.json of SmolLM2-135M (a search's output folder has one)")
    p.add_argument("--blocks", type=int, default=32, help="calibration blocks the refit reads (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default: %(default)s, the recipe's)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="offline data folder (default: $DMS_DATA_DIR or ../shared/data)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    model.eval()
    plan = PrunePlan.from_json(args.plan)
    blocks = load_calibration("default", tokenizer, args.seq_len, args.blocks + 4, data_dir=data_dir_default(args.data_dir))
    calibration, held_out = blocks[: args.blocks], blocks[args.blocks:]
    times, logits = {way: [] for way in WAYS}, {}
    for rep in range(args.reps):
        for way, max_bytes in WAYS.items():
            refit.KEPT_INPUTS_MAX_BYTES = max_bytes
            pruned = prune_model(model, plan)
            started = time.process_time()
            refit.refit_output_projections(pruned, model, PrunePlan.from_dict(plan.to_dict()), calibration)
            times[way].append(time.process_time() - started)
            logits[way] = pruned(held_out).logits
            print(f"rep {rep + 1}/{args.reps} {way}: {times[way][-1]:.1f} CPU s", flush=True)
    medians = {way: statistics.median(t) for way, t in times.items()}
    diff = (logits["kept inputs"] - logits["pruned pass"]).abs().max().item()
    print(f"{args.blocks} blocks x {args.seq_len} tokens, {args.reps} reps (median CPU s): "
          + ", ".join(f"{way} {m:.1f}" for way, m in medians.items())
          + f"; speed-up {medians['pruned pass'] / medians['kept inputs']:.2f}x; max logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
