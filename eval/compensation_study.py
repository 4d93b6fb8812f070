"""How much compensation buys, and which kind: one plan (a search's dms_plan.json, or a baseline computed
here) pruned from SmolLM2-135M and evaluated on the *validation* splits under each compensation variant.

    python eval/compensation_study.py --plan runs/dms80/dms_plan.json --name dms80-s0 --out runs/compensation.json
    python eval/compensation_study.py --method flap --budget 0.8 --out runs/compensation.json

Variants: `none` (the sliced weights), `refit` (o_proj/down_proj refit on the plan's heads and channels) and
`select` (heads and channels chosen again by reconstruction error, same counts, then refit), each refit
with `--refit-samples` calibration blocks (comma-separated: several sizes). Every (plan, variant, samples)
cell is cached in `--out` as soon as it is measured, so a rerun continues where the last one stopped.
Baselines calibrate on the same C4 train blocks as the refit (`--calib-samples` x `--seq-len`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dms_llm.arch import ModelParts
from dms_llm.baselines import METHODS
from dms_llm.baselines.common import output_proj_input_stats, per_group
from dms_llm.baselines.flap import OUTPUT_BIAS, compensation, fluctuation_scores
from dms_llm.checkpoints import count_parameters, load_model_and_tokenizer
from dms_llm.data import load_calibration
from dms_llm.evaluation.perplexity import perplexity
from dms_llm.files import write_json_atomic
from dms_llm.plan import LayerPlan, PrunePlan, count_plan_parameters
from dms_llm.prune import prune_model
from dms_llm.refit import DEFAULT_ALPHA, refit_output_projections
from dms_llm.runs.options import data_dir_default

VALIDATION = ("wikitext2-valid", "ptb-valid")
VARIANTS = {"none": None, "refit": "plan", "select": "reconstruction"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", help="a dms_plan.json of SmolLM2-135M")
    source.add_argument("--method", choices=sorted(METHODS), help="a baseline, computed on the calibration blocks")
    p.add_argument("--budget", type=float, default=0.8, help="with --method: the kept parameter fraction")
    p.add_argument("--align", type=int, default=32, help="with --method: width multiple, as the benchmark uses")
    p.add_argument("--name", help="the row's name (default: the plan's folder, or METHOD-bBUDGET)")
    p.add_argument("--output-bias", action="store_true",
                   help="with --plan: give every kept o_proj/down_proj an output bias (zero until the refit fits it as "
                        "an intercept, as FLAP's plans carry); the row's name gets '+bias'")
    p.add_argument("--mean-compensation", choices=["plan", "fluctuation"],
                   help="with --plan: replace every removed head and channel by its calibration mean (FLAP's output "
                        "biases), keeping the plan's heads and channels ('plan', name +mean) or its widths filled "
                        "with FLAP's best-scored ones ('fluctuation', name +fluct)")
    p.add_argument("--variants", default="none,refit,select", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--refit-samples", default="128", help="calibration blocks for the refit; comma-separated sizes")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the refit's ridge term")
    p.add_argument("--calib-samples", type=int, default=512, help="with --method: calibration blocks")
    p.add_argument("--seq-len", type=int, default=256, help="calibration block length")
    p.add_argument("--max-windows", type=int, default=320, help="128-token windows per validation split")
    p.add_argument("--data-dir", default=None, help="default: $DMS_DATA_DIR, else ../shared/data beside the repository")
    p.add_argument("--out", required=True, help="results JSON (read and extended)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    args.refit_samples = [int(n) for n in args.refit_samples.split(",")]
    args.data_dir = data_dir_default(args.data_dir)
    return args


@torch.no_grad()
def mean_compensated(model, plan: PrunePlan, blocks, select: str) -> PrunePlan:
    """The plan with FLAP's mean compensation of what it removes (so the refit starts where FLAP's own plans
    start); with `select="fluctuation"` each layer's widths are filled with FLAP's best-scored heads and channels."""
    stats = output_proj_input_stats(model, blocks, 8)
    head_cols, chans = fluctuation_scores(model, stats)
    parts = ModelParts(model)
    heads = {i: list(lp.attention_groups) for i, lp in enumerate(plan.layers) if i in head_cols}
    channels = {i: list(lp.mlp_channels) for i, lp in enumerate(plan.layers) if i in chans}
    if select == "fluctuation":
        for i, layer in enumerate(plan.layers):
            if i in head_cols:  # the within-layer order of FLAP's standardised group mean
                score = per_group(head_cols[i], parts, i)
                heads[i] = sorted(score.argsort(descending=True)[: len(layer.attention_groups)].tolist())
            if i in chans:
                channels[i] = sorted(chans[i].argsort(descending=True)[: len(layer.mlp_channels)].tolist())
    values, dropped = compensation(model, stats, heads, channels)
    new = PrunePlan.from_dict(plan.to_dict())
    new.layers = [LayerPlan(heads.get(i, lp.attention_groups), channels.get(i, lp.mlp_channels))
                  for i, lp in enumerate(plan.layers)]
    new.output_bias, new.output_bias_values = dict(OUTPUT_BIAS), values
    new.params_after = count_plan_parameters(new)
    new.metadata = dict(plan.metadata, mean_compensation=select, compensation_dropped=dropped)
    return new


def main(argv=None) -> None:
    args = parse_args(argv)
    results = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    model.eval()
    blocks = load_calibration("default", tokenizer, args.seq_len, max([args.calib_samples, *args.refit_samples]),
                              data_dir=args.data_dir)
    if args.plan:
        plan = PrunePlan.from_json(args.plan)
        name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.plan)))
        if args.output_bias:
            plan.output_bias, plan.output_bias_values = {"attention": True, "mlp": True}, {}
            plan.params_after = count_plan_parameters(plan)
            name += "+bias"
        if args.mean_compensation:
            started = time.perf_counter()
            plan = mean_compensated(model, plan, blocks[: args.calib_samples], args.mean_compensation)
            print(f"mean compensation ({args.mean_compensation}) in {time.perf_counter() - started:.0f} s", flush=True)
            name += "+fluct" if args.mean_compensation == "fluctuation" else "+mean"
    else:
        name = args.name or f"{args.method}-b{args.budget}"
        target = int(args.budget * count_parameters(model))
        started = time.perf_counter()
        with torch.enable_grad():  # LLM-Pruner's scores are gradients
            plan = METHODS[args.method](model, blocks[: args.calib_samples], target, align=args.align)
        print(f"{args.method} plan: {plan.params_after:,} parameters in {time.perf_counter() - started:.0f} s", flush=True)
    for variant in args.variants:
        for samples in ([0] if variant == "none" else args.refit_samples):
            key = f"{name}|{variant}|{samples}" + (f"|alpha={args.alpha:g}" if args.alpha != DEFAULT_ALPHA else "")
            if key in results:
                continue
            pruned = prune_model(model, plan)
            cell = {"name": name, "variant": variant, "refit_samples": samples, "alpha": args.alpha,
                    "params": count_parameters(pruned)}
            if VARIANTS[variant] is not None:
                cell_plan = PrunePlan.from_dict(plan.to_dict())
                cell_plan.output_bias_values = plan.output_bias_values
                cell["refit"] = refit_output_projections(pruned, model, cell_plan, blocks[:samples], alpha=args.alpha,
                                                         select=VARIANTS[variant], progress=True)
            for dataset in VALIDATION:
                cell[dataset] = perplexity(pruned, tokenizer, dataset, max_windows=args.max_windows,
                                           data_dir=args.data_dir, progress=False)["ppl"]
            print(json.dumps({k: v for k, v in cell.items() if k != "refit"}), flush=True)
            # read again before writing: another study may have added cells to the same file meanwhile
            results = json.load(open(args.out)) if os.path.isfile(args.out) else {}
            results[key] = cell
            write_json_atomic(args.out, results)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
