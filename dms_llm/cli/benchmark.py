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
the `--dms-config` recipe (its budget replaced by each --budgets value, its steps by `--dms-steps` where that
names the budget; evaluation switched off there and done here). `--recovery-steps N` adds, for every pruned
model, a row fine-tuned for N steps (a `dms-llm finetune` run, LoRA + distillation on the calibration dataset
by default) with the same settings for every method.

Everything is cached under `--work` (default runs/benchmark/<model>): each (method, budget, recovery)
row is its own JSON in rows/, holding the plan or checkpoint path, the parameter count, the wall time
and every evaluation result keyed by its settings. A rerun, after an interruption or with more datasets
or tasks, computes only what is missing. Outputs: <out>/<model>.json, <model>.md and <model>.png.
`--from-results <out>/<model>.json` fills an empty cache from such a file, on another machine too
(dms_llm.benchmark.restore).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..benchmark.report import markdown, write_outputs
from ..benchmark.cells import parse_ppl_extra, ppl_cells
from ..benchmark.rows import ALL_METHODS, DEFAULT_METHODS, DMS_METHODS, Benchmark
from ..method import DMSConfig
from .options import HelpFormatter, data_dir_default, exit_code
from .restarts import restarts_of


def _apply_config(p: argparse.ArgumentParser, argv) -> str | None:
    """--config FILE: a flat YAML of this command's options (`ppl-extra: [...]` for a repeatable one,
    `llamacpp: true` for a switch); they become the defaults, so the command line overrides them (and adds
    to the repeatable ones). An unknown key is an error."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return None
    if not os.path.isfile(path):
        p.error(f"--config {path} not found")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        p.error(f"--config {path}: expected a mapping of option names to values")
    actions = {a.dest: a for a in p._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            p.error(f"--config {path}: unknown key {key!r}; valid keys are this command's options (see --help)")
        if isinstance(action, argparse._AppendAction):
            value = [str(v) for v in (value if isinstance(value, list) else [value])]
        elif isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                p.error(f"--config {path}: {key} is a switch: true or false, got {value!r}")
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif value is not None and action.type is None:
            value = str(value)
        defaults[dest] = value
    p.set_defaults(**defaults)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dms-llm benchmark", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file of these options (keys as the long option names, e.g. recipes/benchmark/smollm2-135m.yaml); "
                        "the command line overrides it")
    p.add_argument("--model", default="smollm2-135m", help="alias, Hub id or local folder (default: smollm2-135m)")
    p.add_argument("--budgets", default="0.8", help="comma list of kept-parameter fractions, e.g. 0.8,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {','.join(ALL_METHODS)} (default: all but dms-restarts)")
    p.add_argument("--calib-dataset", default="default", help="calibration text of the baselines (data.load_calibration)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration blocks of the baselines")
    p.add_argument("--align", type=int, default=None,
                   help="every method keeps MLP (and DMS hidden) widths in multiples of N; 1: exact (default: the "
                        f"--dms-config recipe's align, else {DMSConfig.align}); a recipe that sets another is an error")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration block")
    p.add_argument("--ppl", default="wikitext2", help="perplexity datasets (comma list, or 'none')")
    p.add_argument("--protocols", default="llm-pruner", help="perplexity protocols: llm-pruner, sparsegpt")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity on the first N windows only")
    p.add_argument("--ppl-extra", action="append", default=[], metavar="DATASETS:PROTOCOL[:WINDOWS[:BUDGETS]]",
                   help="more perplexity cells, for some budgets only if BUDGETS is given (the dense row gets them all); "
                        "WINDOWS a number or 'all' (default), e.g. wikitext2,ptb:sparsegpt:all:0.8 = whole-split 2048-token "
                        "perplexity of the 80%% rows; repeatable; 'none' drops the cells named before it (in --config)")
    p.add_argument("--tasks", default="", help="zero-shot tasks (comma list; empty: none)")
    p.add_argument("--limit", type=float, default=None, help="zero-shot: the first N documents of each task")
    p.add_argument("--dms-config", default=None, help="DMS search recipe (YAML) for the dms, dms-restarts and dms-lora rows")
    p.add_argument("--dms-seeds", default=None,
                   help="the dms rows: one search per seed (comma list); the table shows their median per cell with the "
                        "smallest and largest value (default: --seed, --seed+1, --seed+2)")
    p.add_argument("--dms-steps", default=None, metavar="BUDGET=STEPS[,...]",
                   help="search steps for the DMS rows of a budget, in place of the --dms-config recipe's, e.g. 0.5=480 "
                        "(a search far below the dense size needs more steps to follow its budget)")
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
    p.add_argument("--llamacpp", action=argparse.BooleanOptionalAction, default=False,
                   help="llama.cpp speed columns: each row's checkpoint and the dense model exported to GGUF "
                        "(--llamacpp-outtype) and timed in llama.cpp, interleaved (needs the llamacpp extra)")
    p.add_argument("--llamacpp-outtype", default="q8_0", help="GGUF type of the llama.cpp timing (default: %(default)s)")
    p.add_argument("--llamacpp-threads", type=int, default=1, help="llama.cpp threads (default: %(default)s)")
    p.add_argument("--llamacpp-reps", type=int, default=5, help="interleaved repetitions per row (default: %(default)s)")
    p.add_argument("--llamacpp-pp", type=int, default=512, help="prompt-processing tokens (default: %(default)s)")
    p.add_argument("--llamacpp-tg", type=int, default=128, help="generated tokens (default: %(default)s)")
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
    p.add_argument("--from-results", default=None, metavar="FILE",
                   help="first fill the cache with the rows of a results file this command wrote (e.g. the published "
                        "eval/results/smollm2-135m.json) that it lacks: their measurements are taken as they are, and a "
                        "row's model is built again only when a missing cell needs it, then checked against the file")
    p.add_argument("--report-only", action="store_true",
                   help="write the table, JSON and plot from the cached rows; compute nothing (missing cells stay empty)")
    config = _apply_config(p, argv)
    args = p.parse_args(argv)
    args.config = config
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
    recipe_align = None
    if args.dms_config:  # one alignment for every method: the DMS recipe's, unless --align says the same
        from .options import ConfigError
        from .search import load_recipe

        try:
            recipe_align = load_recipe(args.dms_config).get("align")
        except ConfigError as e:
            p.error(f"--dms-config: {e}")
    if args.align is None:
        args.align = DMSConfig.align if recipe_align is None else int(recipe_align)
    elif recipe_align is not None and int(recipe_align) != args.align:
        p.error(f"--align {args.align}, but the --dms-config recipe {args.dms_config} sets align: {recipe_align}; the "
                "benchmark aligns every method alike: drop --align or make them agree")
    if args.align < 1:
        p.error(f"--align must be at least 1, got {args.align}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.recovery_steps < 0 or args.calib_samples < 1 or args.seq_len < 1:
        p.error("--recovery-steps must be >= 0, --calib-samples and --seq-len >= 1")
    if args.dms_restarts < 2:
        p.error(f"--dms-restarts must be at least 2 (a dms row is one search), got {args.dms_restarts}")
    try:
        from ..evaluation.perplexity import check_ppl_datasets, check_protocols

        extra = []
        for spec in args.ppl_extra:  # 'none' drops the cells before it (a --config file's): a quick first pass
            extra = [] if spec.strip() == "none" else extra + parse_ppl_extra(spec)
        from ..evaluation.zero_shot import check_tasks

        # 'all' expands, aliases (dms_boolq) become the task's key
        args.ppl, args.protocols, args.tasks = check_ppl_datasets(args.ppl), check_protocols(args.protocols), check_tasks(args.tasks)
    except ValueError as e:
        p.error(str(e))
    args.ppl_cells = ppl_cells(args.ppl, args.protocols, args.max_windows, extra)
    try:
        args.dms_seeds = ([int(x) for x in args.dms_seeds.split(",") if x.strip()] if args.dms_seeds is not None
                          else [args.seed, args.seed + 1, args.seed + 2])
    except ValueError:
        p.error(f"--dms-seeds must be a comma list of integers, got {args.dms_seeds!r}")
    if not args.dms_seeds or len(set(args.dms_seeds)) != len(args.dms_seeds):
        p.error(f"--dms-seeds must name at least one seed, each once; got {args.dms_seeds}")
    command_line = argparse.ArgumentParser(add_help=False)  # --dms-steps typed (abbreviated too), not from --config
    command_line.add_argument("--dms-steps")
    args.dms_steps = _budget_steps(p, args.dms_steps, args.budgets,
                                   strict=command_line.parse_known_args(argv)[0].dms_steps is not None)
    if args.llamacpp:
        import importlib.util

        from ..export.gguf import OUTTYPES

        # --report-only reads the cached timings; only measuring them needs llama.cpp
        if importlib.util.find_spec("llama_cpp") is None and not args.report_only:
            p.error("--llamacpp needs llama-cpp-python: pip install '.[llamacpp]' (builds llama.cpp, 15-30 min), "
                    "or --no-llamacpp")
        if args.llamacpp_outtype not in OUTTYPES:
            p.error(f"--llamacpp-outtype: choose from {sorted(OUTTYPES)}")
        if min(args.llamacpp_threads, args.llamacpp_reps, args.llamacpp_pp, args.llamacpp_tg) < 1:
            p.error("--llamacpp-threads, -reps, -pp and -tg must be at least 1")
    if args.from_results:
        from ..benchmark.restore import read_results

        try:
            args.published = read_results(args.from_results)  # read once, checked before any work
        except ValueError as e:
            p.error(str(e))
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
            searches = restarts_of(folder)
            if searches != args.dms_restarts:
                p.error(f"--adopt {spec!r}: a dms-restarts row needs a `dms-llm search --restarts {args.dms_restarts}` run; "
                        f"{folder} holds {searches or 'no restarts.json, so one search'}")
        seed = args.seed
        if method == "dms":  # a dms folder fills the row of the seed it was searched with
            settings = os.path.join(folder, "search_config.json")
            if os.path.isfile(settings):
                import json

                with open(settings) as f:
                    seed = json.load(f).get("seed", args.seed)
            if seed not in args.dms_seeds:
                p.error(f"--adopt {spec!r}: {folder} was searched with seed {seed}, not one of --dms-seeds {args.dms_seeds}")
        args.adopted[(method, budget, seed)] = os.path.abspath(folder)
    args.label = Path(args.model.rstrip("/")).name if os.path.isdir(args.model) else args.model.replace("/", "--")
    args.work = os.path.abspath(args.work or os.path.join("runs", "benchmark", args.label))
    args.data_dir = data_dir_default(args.data_dir)
    return args


def _budget_steps(p: argparse.ArgumentParser, spec, budgets, strict: bool = True) -> dict[float, int]:
    """--dms-steps BUDGET=STEPS[,...] as {budget: steps}. A budget that is not one of --budgets is an error when
    `strict` (given on the command line: likely a typo); from a --config file it is dropped with a note, so that
    a preset still runs with fewer --budgets."""
    steps, names = {}, ",".join(f"{b:g}" for b in budgets)
    for item in str(spec or "").split(","):
        if not item.strip():
            continue
        try:
            budget, n = item.split("=")
            budget, n = float(budget), int(n)
        except ValueError:
            p.error(f"--dms-steps: expected BUDGET=STEPS[,...], e.g. 0.5=480; got {spec!r}")
        if n < 1 or (strict and budget not in budgets):
            p.error(f"--dms-steps {item.strip()}: the budget must be one of --budgets {names} "
                    f"and the steps at least 1")
        if budget not in budgets:
            print(f"[benchmark] dms-steps {item.strip()} (--config) left out: {budget:g} is not one of --budgets {names}")
            continue
        steps[budget] = n
    return steps


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
    if args.from_results:
        from ..benchmark.restore import restore_rows

        planned = [(m, b, r, seed) for m, b, r in plan_rows(args) for seed in bench.seeds(m)]
        count = restore_rows(bench, args.published, args.from_results, planned)
        print(f"[benchmark] {count} row(s) restored from {args.from_results}: their measurements as they are; a model "
              "is built again only where a missing cell needs it", flush=True)
    done = []
    for method, budget, recovery in plan_rows(args):
        for seed in bench.seeds(method):  # dms: a row per --dms-seeds seed
            if args.report_only:
                row = bench.load_row(method, budget, recovery, seed)
                if row["params"] is None:
                    print(f"[benchmark] --report-only: {row['name']} was never built; left out", flush=True)
                else:
                    bench.describe(row)
                    done.append(row)
                continue
            row = bench.ensure_built(method, budget, recovery, seed)
            bench.evaluate(row)
            done.append(row)
            write_outputs(bench, done, argv)
    report = write_outputs(bench, done, argv)
    print(markdown(report))
    return 0


