"""Side-by-side benchmark: dense, the one-shot baselines and DMS at the same parameter budgets.

    dms-llm benchmark --model smollm2-135m --budgets 0.8,0.5 \
        --methods dense,magnitude,wanda-sp,llm-pruner,flap,shortgpt,dms,dms-lora \
        --ppl wikitext2,ptb --protocol llm-pruner --max-windows 320 \
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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..benchmark.cells import parse_ppl_extra, ppl_cells
from ..benchmark.report import markdown, write_outputs
from ..benchmark.row import CurvePoint
from ..benchmark.rows import ALL_METHODS, DEFAULT_METHODS, DMS_METHODS, Benchmark
from ..method import DMSConfig
from ..runs.options import ConfigError, data_dir_default, exit_code, make, option, read_options
from ..runs.restarts import restarts_of
from .run_eval import DTYPES, EvalOptions


@dataclass
class BenchmarkConfig(EvalOptions):
    """`dms-llm benchmark`: what is measured (`EvalOptions`, as `dms-llm eval`), the rows and their cache."""

    DEPRECATED: ClassVar[dict] = {"protocols": "protocol", "out": "output_dir"}  # the spellings before one per option

    model: str = option("smollm2-135m", "alias, Hub id or local folder")
    budgets: str = option("0.8", "comma list of kept-parameter fractions, e.g. 0.8,0.5")
    methods: str = option(",".join(DEFAULT_METHODS), f"comma list from {','.join(ALL_METHODS)} (default: all but dms-restarts "
                                                          "and the +compensation rows, which read the --dms-config recipe)")
    calib_dataset: str = option("default", "calibration text of the baselines (data.load_calibration)")
    calib_samples: int = option(128, "calibration blocks of the baselines")
    align: int | None = option(None, "every method keeps MLP (and DMS hidden) widths in multiples of N; 1: exact (default: "
                                     f"the --dms-config recipe's align, else {DMSConfig.align}); a recipe that sets another is an error")
    seq_len: int = option(128, "tokens per calibration block")
    ppl_extra: list[str] = option([], "DATASETS:PROTOCOL[:WINDOWS[:BUDGETS]]: more perplexity cells, for some budgets only "
                                      "if BUDGETS is given (the dense row gets them all); WINDOWS a number or 'all' (default), "
                                      "e.g. wikitext2,ptb:sparsegpt:all:0.8 = whole-split 2048-token perplexity of the 80%% "
                                      "rows; repeatable; 'none' drops the cells named before it (in --config)", repeatable=True)
    dms_config: str | None = option(None, "DMS search recipe (YAML) for the dms, dms-restarts and dms-lora rows")
    dms_budget_config: str | None = option(None, "BUDGET=FILE[,...]: the DMS recipe of one budget's rows, in place of "
                                                 "--dms-config, e.g. 0.5=recipes/smollm2-135m-heads-kept.yaml (a recipe that "
                                                 "suits 80%% may not suit 50%%)")
    dms_seeds: str | None = option(None, "the dms rows: one search per seed (comma list); the table shows their median per "
                                         "cell with the smallest and largest value (default: --seed, --seed+1, --seed+2)")
    dms_steps: str | None = option(None, "BUDGET=STEPS[,...]: search steps for the DMS rows of a budget, in place of the "
                                         "--dms-config recipe's, e.g. 0.5=480 (a search far below the dense size needs more "
                                         "steps to follow its budget)")
    dms_restarts: int = option(3, "searches behind a dms-restarts row; the lowest held-out calibration loss is kept")
    adopt: list[str] = option([], "METHOD@BUDGET=DIR: use a finished DMS search folder (dms-llm search --output-dir) for "
                                  "that row instead of searching, e.g. dms@0.8=runs/smollm2-80; repeatable", repeatable=True)
    skip: list[str] = option([], "METHOD@BUDGET: leave this row out (e.g. dms-lora@0.5 when that search is too long for the "
                                 "machine); repeatable", repeatable=True)
    recovery_steps: int = option(0, "also fine-tune every pruned model for N steps")
    recovery_config: str | None = option(None, "fine-tuning recipe (YAML, `dms-llm finetune` options) of the recovery rows; "
                                               "its model, output and step count are set here. Default: LoRA + distillation "
                                               "on the calibration dataset")
    recovery_curve: str | None = option(None, "TOKENS[,...]: the recovery curve, one more recovered row per point, each a "
                                              "fine-tuning run of that many tokens with --recovery-curve-config, for the "
                                              "--curve-methods at the --curve-budgets (dms: its median seed), e.g. "
                                              "65536,262144,1048576; none: no curve (the preset has one)")
    recovery_curve_config: str | None = option(None, "fine-tuning recipe of the curve's rows (its length is each point's); "
                                                     "default: --recovery-config")
    curve_methods: str = option("dms,flap+compensation,llm-pruner+compensation", "methods of the recovery curve (those "
                                                                                  "of --methods)")
    curve_budgets: str = option("0.8", "budgets of the recovery curve (those of --budgets)")
    speed_reps: int = option(5, "timed runs per model for prefill/decode speed (0: skip)")
    speed_seq_len: int = option(128, "prefill length of the speed test")
    speed_new_tokens: int = option(32, "decode steps of the speed test (after 32 prompt tokens)")
    llamacpp: bool = option(False, "llama.cpp speed columns: each row's checkpoint and the dense model exported to GGUF "
                                   "(--llamacpp-outtype) and timed in llama.cpp, interleaved (needs the llamacpp extra)")
    llamacpp_outtype: str = option("q8_0", "GGUF type of the llama.cpp timing")
    llamacpp_threads: int = option(1, "llama.cpp threads")
    llamacpp_reps: int = option(5, "interleaved repetitions per row")
    llamacpp_pp: int = option(512, "prompt-processing tokens")
    llamacpp_tg: int = option(128, "generated tokens")
    train_dtype: str = option("auto", "weights dtype of the DMS searches and the recovery fine-tuning: auto = bf16 on a "
                                      "GPU, fp32 on a CPU", choices=("auto", *DTYPES))
    device: str = option("auto", "where models are evaluated and baselines calibrate: auto (cuda when available), cpu, "
                                 "cuda, cuda:1 ... (searches and fine-tuning use Accelerate's device)")
    output_dir: str = option(os.path.join("eval", "results"), "folder of <model>.json/.md/.png")
    work: str | None = option(None, "cache folder (default: runs/benchmark/<model>, under the current folder)")
    from_results: str | None = option(None, "first fill the cache with the rows of a results file this command wrote (e.g. "
                                             "the published eval/results/smollm2-135m.json) that it lacks: their measurements "
                                             "are taken as they are, and a row's model is built again only when a missing "
                                             "cell needs it, then checked against the file")
    report_only: bool = option(False, "write the table, JSON and plot from the cached rows; compute nothing (missing cells "
                                      "stay empty)")

    def __post_init__(self):
        super().__post_init__()
        if self.recovery_steps < 0 or self.calib_samples < 1 or self.seq_len < 1:
            raise ConfigError("--recovery-steps must be >= 0, --calib-samples and --seq-len >= 1")
        if self.dms_restarts < 2:
            raise ConfigError(f"--dms-restarts must be at least 2 (a dms row is one search), got {self.dms_restarts}")
        for flag, path in (("--dms-config", self.dms_config), ("--recovery-config", self.recovery_config),
                           ("--recovery-curve-config", self.recovery_curve_config)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{flag} {path} not found")


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's settings: the options, checked, with what they resolve to (lists, the alignment,
    the device, the perplexity cells, the adopted folders), every error before any work."""
    values, given, path = read_options(BenchmarkConfig, argv, __doc__, prog="dms-llm benchmark")
    cfg = make(BenchmarkConfig, values)
    args = argparse.Namespace(**vars(cfg), config=path, out=cfg.output_dir)
    args.budgets = [float(b) for b in cfg.budgets.split(",") if b.strip()]
    if not args.budgets or any(not 0 < b < 1 for b in args.budgets):
        raise ConfigError(f"--budgets must be fractions in (0, 1), got {args.budgets}")
    args.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown or not args.methods:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {','.join(ALL_METHODS)}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _measured(args, cfg)
    args.dms_seeds = _seeds(cfg)
    # a budget a --config file's --dms-steps names is left out when not benchmarked; on the command line, a typo
    args.dms_steps = _per_budget("--dms-steps", cfg.dms_steps, args.budgets, _steps, strict="dms_steps" in given)
    args.dms_budget_config = _per_budget("--dms-budget-config", cfg.dms_budget_config, args.budgets, _recipe_file,
                                         strict="dms_budget_config" in given)
    args.align = _align(cfg, ([cfg.dms_config] if cfg.dms_config else []) + list(args.dms_budget_config.values()))
    args.curve = _curve(cfg, args, strict=bool({"curve_methods", "curve_budgets"} & set(given)))
    if cfg.llamacpp:
        _check_llamacpp(cfg)
    if cfg.from_results:
        from ..benchmark.restore import read_results

        try:
            args.published = read_results(cfg.from_results)  # read once, checked before any work
        except ValueError as e:
            raise ConfigError(str(e)) from None
    args.adopted = _adopted(cfg, args.dms_seeds)
    args.label = Path(cfg.model.rstrip("/")).name if os.path.isdir(cfg.model) else cfg.model.replace("/", "--")
    args.work = os.path.abspath(cfg.work or os.path.join("runs", "benchmark", args.label))
    args.data_dir = data_dir_default(cfg.data_dir)
    return args


def _align(cfg: BenchmarkConfig, files: list[str]) -> int:
    """One alignment for every method: the DMS recipes' (`files`: --dms-config and the --dms-budget-config
    recipes of the benchmarked budgets), unless --align says the same."""
    from ..runs.search import load_recipe

    aligns = {f: load_recipe(f).get("align") for f in files if os.path.isfile(f)}
    aligns = {f: int(v) for f, v in aligns.items() if v is not None}
    if len(set(aligns.values())) > 1:
        raise ConfigError(f"the DMS recipes set different aligns ({aligns}); the benchmark aligns every method alike")
    recipe_align = next(iter(aligns.values()), None)
    align = cfg.align
    if align is None:
        align = DMSConfig.align if recipe_align is None else recipe_align
    elif recipe_align is not None and recipe_align != align:
        raise ConfigError(f"--align {align}, but the DMS recipe(s) set align: {recipe_align} ({', '.join(aligns)}); the "
                          "benchmark aligns every method alike: drop --align or make them agree")
    if align < 1:
        raise ConfigError(f"--align must be at least 1, got {align}")
    return align


def _measured(args, cfg: BenchmarkConfig) -> None:
    """The perplexity datasets, protocols and tasks as lists ('all' expanded, aliases such as dms_boolq made
    the task's key) and the perplexity cells, extra ones included ('none' drops those before it)."""
    from ..evaluation.perplexity import check_ppl_datasets, check_protocols
    from ..evaluation.zero_shot import check_tasks

    split = lambda s: [x.strip() for x in (s or "").split(",") if x.strip() and x.strip() != "none"]  # noqa: E731
    extra = []
    for spec in cfg.ppl_extra:
        extra = [] if spec.strip() == "none" else extra + parse_ppl_extra(spec)
    args.ppl, args.protocols, args.tasks = (check_ppl_datasets(split(cfg.ppl)), check_protocols(split(cfg.protocol)),
                                            check_tasks(split(cfg.tasks)))
    args.ppl_cells = ppl_cells(args.ppl, args.protocols, cfg.max_windows, extra)


def _seeds(cfg: BenchmarkConfig) -> list[int]:
    if cfg.dms_seeds is None:
        return [cfg.seed, cfg.seed + 1, cfg.seed + 2]
    try:
        seeds = [int(x) for x in cfg.dms_seeds.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--dms-seeds must be a comma list of integers, got {cfg.dms_seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--dms-seeds must name at least one seed, each once; got {seeds}")
    return seeds


def _check_llamacpp(cfg: BenchmarkConfig) -> None:
    import importlib.util

    from ..export.gguf import OUTTYPES

    # --report-only reads the cached timings; only measuring them needs llama.cpp
    if importlib.util.find_spec("llama_cpp") is None and not cfg.report_only:
        raise ConfigError("--llamacpp needs llama-cpp-python: pip install '.[llamacpp]' (builds llama.cpp, 15-30 min), "
                          "or --no-llamacpp")
    if cfg.llamacpp_outtype not in OUTTYPES:
        raise ConfigError(f"--llamacpp-outtype: choose from {sorted(OUTTYPES)}")
    if min(cfg.llamacpp_threads, cfg.llamacpp_reps, cfg.llamacpp_pp, cfg.llamacpp_tg) < 1:
        raise ConfigError("--llamacpp-threads, -reps, -pp and -tg must be at least 1")


def _adopted(cfg: BenchmarkConfig, dms_seeds: list[int]) -> dict:
    """--adopt METHOD@BUDGET=DIR as {(method, budget, seed): folder}, each folder checked to be that row's search."""
    from ..files import read_json

    adopted = {}
    for spec in cfg.adopt:
        try:
            key, folder = spec.split("=", 1)
            method, budget = key.split("@", 1)
            budget = float(budget)
        except ValueError:
            raise ConfigError(f"--adopt {spec!r}: expected METHOD@BUDGET=DIR, e.g. dms@0.8=runs/smollm2-80") from None
        if method not in DMS_METHODS:
            raise ConfigError(f"--adopt: only {'/'.join(DMS_METHODS)} rows can adopt a search folder, got {method!r}")
        if not os.path.isfile(os.path.join(folder, "search_summary.json")):
            raise ConfigError(f"--adopt {spec!r}: {folder} holds no search_summary.json (not a finished dms-llm search run)")
        if method == "dms-restarts" and restarts_of(folder) != cfg.dms_restarts:
            raise ConfigError(f"--adopt {spec!r}: a dms-restarts row needs a `dms-llm search --restarts {cfg.dms_restarts}` "
                              f"run; {folder} holds {restarts_of(folder) or 'no restarts.json, so one search'}")
        seed = cfg.seed
        if method == "dms":  # a dms folder fills the row of the seed it was searched with
            settings = os.path.join(folder, "search_config.json")
            if os.path.isfile(settings):
                seed = read_json(settings).get("seed", cfg.seed)
            if seed not in dms_seeds:
                raise ConfigError(f"--adopt {spec!r}: {folder} was searched with seed {seed}, not one of --dms-seeds {dms_seeds}")
        adopted[(method, budget, seed)] = os.path.abspath(folder)
    return adopted


def _curve(cfg: BenchmarkConfig, args, strict: bool) -> list[tuple[str, float, CurvePoint]]:
    """The recovery curve's rows, (method, budget, CurvePoint) in order; [] without --recovery-curve. A method or
    budget of --curve-methods/--curve-budgets that is not benchmarked is an error on the command line, and left
    out from a --config file (as --dms-steps)."""
    if not cfg.recovery_curve or cfg.recovery_curve.strip().lower() == "none":
        return []
    try:
        points = [int(float(t)) for t in cfg.recovery_curve.split(",") if t.strip()]
    except ValueError:
        points = []
    if not points or min(points) < 1:
        raise ConfigError(f"--recovery-curve {cfg.recovery_curve!r}: expected token counts, e.g. 65536,262144,1048576")
    methods = [m.strip() for m in cfg.curve_methods.split(",") if m.strip()]
    try:
        budgets = [float(b) for b in cfg.curve_budgets.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--curve-budgets {cfg.curve_budgets!r}: expected fractions, e.g. 0.8") from None
    absent = [m for m in methods if m not in args.methods or m == "dense"] + [f"{b:g}" for b in budgets if b not in args.budgets]
    if absent and strict:
        raise ConfigError(f"--curve-methods/--curve-budgets name {absent}, which are not benchmarked (--methods, --budgets; "
                          "dense has no recovery)")
    if absent:
        print(f"[benchmark] recovery curve (--config): {', '.join(absent)} left out, not benchmarked")
    return [(m, b, CurvePoint(t)) for b in budgets if b in args.budgets for m in methods
            if m in args.methods and m != "dense" for t in sorted(set(points))]


def _steps(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError("at least 1 step")
    return n


def _recipe_file(text: str) -> str:
    if not os.path.isfile(text):
        raise ValueError(f"{text} not found")
    return text


def _per_budget(flag: str, spec, budgets, parse, strict: bool = True) -> dict:
    """BUDGET=VALUE[,...] (--dms-steps, --dms-budget-config) as {budget: parse(VALUE)}. A budget that is not one
    of --budgets is an error when `strict` (given on the command line: likely a typo); from a --config file it
    is dropped with a note, so that a preset still runs with fewer --budgets."""
    values, names = {}, ",".join(f"{b:g}" for b in budgets)
    for item in str(spec or "").split(","):
        if not item.strip():
            continue
        try:
            budget, value = item.split("=")
            budget, value = float(budget), parse(value.strip())
        except ValueError as e:
            raise ConfigError(f"{flag} {item.strip()!r}: expected BUDGET=VALUE[,...] with a budget of --budgets "
                              f"{names} ({e})") from None
        if budget not in budgets:
            if strict:
                raise ConfigError(f"{flag} {item.strip()}: the budget must be one of --budgets {names}")
            print(f"[benchmark] {flag[2:]} {item.strip()} (--config) left out: {budget:g} is not one of --budgets {names}")
            continue
        values[budget] = value
    return values


def plan_rows(args) -> list[tuple[str, float, int | CurvePoint]]:
    todo = [("dense", 1.0, 0)] if "dense" in args.methods else []
    skipped = {(m, float(b)) for m, b in (spec.split("@", 1) for spec in getattr(args, "skip", []))}
    for budget in args.budgets:
        for m in args.methods:
            if m == "dense" or (m, float(budget)) in skipped:
                continue
            todo.append((m, budget, 0))
            if args.recovery_steps:
                todo.append((m, budget, args.recovery_steps))
    return todo + [row for row in getattr(args, "curve", []) if (row[0], row[1]) not in skipped]


def main(argv=None) -> int:
    return exit_code(lambda: run_benchmark(parse_args(argv), argv))  # one `error: ...` line, like the other commands


def run_benchmark(args, argv) -> int:
    if any(m in DMS_METHODS for m in args.methods) and not args.dms_config and not args.dms_budget_config:
        print("[benchmark] no --dms-config: DMS rows use the SearchConfig defaults with the benchmark's calibration settings",
              flush=True)
    bench = Benchmark(args)
    if args.from_results:
        from ..benchmark.restore import restore_rows

        planned = [(m, b, r, seed) for m, b, r in plan_rows(args) for seed in bench.seeds(m, b, r)]
        count = restore_rows(bench, args.published, args.from_results, planned)
        print(f"[benchmark] {count} row(s) restored from {args.from_results}: their measurements as they are; a model "
              "is built again only where a missing cell needs it", flush=True)
    done = []
    for method, budget, recovery in plan_rows(args):
        for seed in bench.seeds(method, budget, recovery):  # dms: a row per --dms-seeds seed (a curve point: one)
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


