"""Side-by-side benchmark: dense, the one-shot baselines and DMS at the same parameter budgets.

    dms-llm benchmark --model smollm2-135m --budgets 0.8,0.5 \
        --methods dense,magnitude,wanda-sp,llm-pruner,flap,shortgpt,dms,dms-lora \
        --ppl wikitext2,ptb --protocols llm-pruner --max-windows 320 \
        --dms-config recipes/smollm2-135m-default.yaml

Every pruned model is evaluated the same way (dms_llm.evaluation.evaluate_model), timed against the dense
model (dms_llm.evaluation.speed, interleaved runs, medians), and its pruning/search wall time recorded. The
one-shot baselines (dms_llm.baselines) all calibrate on the same blocks (`--calib-dataset`, default the C4
train sample; never an evaluation split). `dms` is one DMS search with frozen weights, `dms-restarts` the
best of `--dms-restarts` such searches by held-out calibration loss (`dms-llm search --restarts`),
`dms-lora` one search with LoRA and distillation from the unpruned model, each a `dms-llm search` run with
the `--dms-config` recipe (its budget replaced by each --budgets value; evaluation switched off there and
done here). `--recovery-steps N` adds, for every pruned model, a row fine-tuned for N steps (a
`dms-llm finetune` run, LoRA + distillation on the calibration dataset by default) with the same
settings for every method.

Everything is cached under `--work` (default runs/benchmark/<model>): each (method, budget, recovery)
row is its own JSON in rows/, holding the plan or checkpoint path, the parameter count, the wall time
and every evaluation result keyed by its settings. A rerun, after an interruption or with more datasets
or tasks, computes only what is missing. Outputs: <out>/<model>.json, <model>.md and <model>.png.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..benchmark.report import markdown, write_outputs
from ..benchmark.rows import ALL_METHODS, DEFAULT_METHODS, DMS_METHODS, Benchmark, _restarts_of
from ..method import DMSConfig
from .options import HelpFormatter, data_dir_default, exit_code


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dms-llm benchmark", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, Hub id or local folder (default: smollm2-135m)")
    p.add_argument("--budgets", default="0.8", help="comma list of kept-parameter fractions, e.g. 0.8,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {','.join(ALL_METHODS)} (default: all but dms-restarts)")
    p.add_argument("--calib-dataset", default="default", help="calibration text of the baselines (data.load_calibration)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration blocks of the baselines")
    p.add_argument("--align", type=int, default=DMSConfig.align,
                   help="every method keeps MLP (and DMS hidden) widths in multiples of N; 1: exact (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration block")
    p.add_argument("--ppl", default="wikitext2", help="perplexity datasets (comma list, or 'none')")
    p.add_argument("--protocols", default="llm-pruner", help="perplexity protocols: llm-pruner, sparsegpt")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity on the first N windows only")
    p.add_argument("--tasks", default="", help="zero-shot tasks (comma list; empty: none)")
    p.add_argument("--limit", type=float, default=None, help="zero-shot: the first N documents of each task")
    p.add_argument("--dms-config", default=None, help="DMS search recipe (YAML) for the dms, dms-restarts and dms-lora rows")
    p.add_argument("--dms-restarts", type=int, default=3,
                   help="searches behind a dms-restarts row; the lowest held-out calibration loss is kept (default 3)")
    p.add_argument("--adopt", action="append", default=[], metavar="METHOD@BUDGET=DIR",
                   help="use a finished DMS search folder (dms-llm search --output-dir) for that row instead of "
                        "searching, e.g. dms@0.8=runs/smollm2-80; repeatable")
    p.add_argument("--skip", action="append", default=[], metavar="METHOD@BUDGET",
                   help="leave this row out (e.g. dms-lora@0.5 when that search is too long for the machine); repeatable")
    p.add_argument("--recovery-steps", type=int, default=0, help="also fine-tune every pruned model for N steps")
    p.add_argument("--recovery-config", default=None,
                   help="fine-tuning recipe (YAML, `dms-llm finetune` options) of the recovery rows; its model, "
                        "output and step count are set here. Default: LoRA + distillation on the calibration dataset")
    p.add_argument("--speed-reps", type=int, default=5, help="timed runs per model for prefill/decode speed (0: skip)")
    p.add_argument("--speed-seq-len", type=int, default=128, help="prefill length of the speed test")
    p.add_argument("--speed-new-tokens", type=int, default=32, help="decode steps of the speed test (after 32 prompt tokens)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $DMS_DATA_DIR, else ../shared/data beside the repository)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights dtype of the evaluations and the baselines' calibration")
    p.add_argument("--train-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype of the DMS searches and the recovery fine-tuning: auto = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", default="auto", help="where models are evaluated and baselines calibrate: auto (cuda when "
                                                    "available), cpu, cuda, cuda:1 ... (searches and fine-tuning use Accelerate's device)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward in calibration and evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("eval", "results"), help="folder of <model>.json/.md/.png")
    p.add_argument("--work", default=None, help="cache folder (default: runs/benchmark/<model>, under the current folder)")
    p.add_argument("--report-only", action="store_true",
                   help="write the table, JSON and plot from the cached rows; compute nothing (missing cells stay empty)")
    args = p.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if not args.budgets or any(not 0 < b < 1 for b in args.budgets):
        p.error(f"--budgets must be fractions in (0, 1), got {args.budgets}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown or not args.methods:
        p.error(f"unknown method(s) {unknown}; choose from {','.join(ALL_METHODS)}")
    split = lambda s: [x.strip() for x in (s or "").split(",") if x.strip() and x.strip() != "none"]  # noqa: E731
    args.ppl, args.protocols, args.tasks = split(args.ppl), split(args.protocols), split(args.tasks)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    for flag, path in (("--dms-config", args.dms_config), ("--recovery-config", args.recovery_config)):
        if path and not os.path.isfile(path):
            p.error(f"{flag} {path} not found")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.recovery_steps < 0 or args.calib_samples < 1 or args.seq_len < 1:
        p.error("--recovery-steps must be >= 0, --calib-samples and --seq-len >= 1")
    if args.dms_restarts < 2:
        p.error(f"--dms-restarts must be at least 2 (a dms row is one search), got {args.dms_restarts}")
    args.adopted = {}
    for spec in args.adopt:
        try:
            key, folder = spec.split("=", 1)
            method, budget = key.split("@", 1)
            budget = float(budget)
        except ValueError:
            p.error(f"--adopt {spec!r}: expected METHOD@BUDGET=DIR, e.g. dms@0.8=runs/smollm2-80")
        if method not in DMS_METHODS:
            p.error(f"--adopt: only {'/'.join(DMS_METHODS)} rows can adopt a search folder, got {method!r}")
        if not os.path.isfile(os.path.join(folder, "search_summary.json")):
            p.error(f"--adopt {spec!r}: {folder} holds no search_summary.json (not a finished dms-llm search run)")
        if method == "dms-restarts":
            searches = _restarts_of(folder)
            if searches != args.dms_restarts:
                p.error(f"--adopt {spec!r}: a dms-restarts row needs a search.py --restarts {args.dms_restarts} run; "
                        f"{folder} holds {searches or 'no restarts.json, so one search'}")
        args.adopted[(method, budget)] = os.path.abspath(folder)
    args.label = Path(args.model.rstrip("/")).name if os.path.isdir(args.model) else args.model.replace("/", "--")
    args.work = os.path.abspath(args.work or os.path.join("runs", "benchmark", args.label))
    args.data_dir = data_dir_default(args.data_dir)
    return args


def plan_rows(args) -> list[tuple[str, float, int]]:
    todo = [("dense", 1.0, 0)] if "dense" in args.methods else []
    skipped = {(m, float(b)) for m, b in (spec.split("@", 1) for spec in getattr(args, "skip", []))}
    for budget in args.budgets:
        for m in args.methods:
            if m == "dense" or (m, float(budget)) in skipped:
                continue
            todo.append((m, budget, 0))
            if args.recovery_steps:
                todo.append((m, budget, args.recovery_steps))
    return todo


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run_benchmark(args, argv))  # one `error: ...` line, like the other commands


def run_benchmark(args, argv) -> int:
    if any(m in DMS_METHODS for m in args.methods) and not args.dms_config:
        print("[benchmark] no --dms-config: DMS rows use the SearchConfig defaults with the benchmark's calibration settings",
              flush=True)
    bench = Benchmark(args)
    done = []
    for method, budget, recovery in plan_rows(args):
        if args.report_only:
            row = bench.load_row(method, budget, recovery)
            if row["params"] is None:
                print(f"[benchmark] --report-only: {row['name']} was never built; left out", flush=True)
            else:
                done.append(row)
            continue
        row = bench.ensure_built(method, budget, recovery)
        bench.evaluate(row)
        done.append(row)
        write_outputs(bench, done, argv)
    report = write_outputs(bench, done, argv)
    print(markdown(report))
    return 0


