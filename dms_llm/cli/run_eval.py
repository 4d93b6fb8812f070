"""Evaluate a dense or pruned model: perplexity (LLM-Pruner / SparseGPT protocols) and lm-eval zero-shot.

    dms-llm eval MODEL_OR_DIR --ppl wikitext2,ptb --protocol llm-pruner,sparsegpt --tasks all [--baseline DENSE]

MODEL_OR_DIR is an alias (`smollm2-135m`), a Hub id, or a local folder (a stock or a `dms_llama`
checkpoint). Results go to DIR/eval/results.json (+ results.md) for a local folder, else to --output
(default ./outputs/eval/<name>/results.json). See dms_llm/evaluation/perplexity.py for the exact protocols.
"""

from __future__ import annotations

import gc
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..runs.options import ConfigError, data_dir_default, exit_code, option
from ..runs.options import parse_config as _parse_config

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvalOptions:
    """What is measured and how, in `dms-llm eval` and `dms-llm benchmark` alike (the training commands
    name the same settings `--eval-*`: there they describe the evaluation after the run)."""

    ppl: str = option("wikitext2", "perplexity datasets (comma list): wikitext2, wikitext2-valid, ptb (test), ptb-valid, "
                                   "c4, 'all' or 'none'")
    protocol: str = option("llm-pruner", "perplexity protocols (comma list): llm-pruner (128-token windows), sparsegpt "
                                         "(2048), or 'all'")
    max_windows: int | None = option(None, "perplexity: only the first N windows")
    tasks: str = option("none", "zero-shot tasks (comma list): boolq, piqa, hellaswag, winogrande, arc_easy, "
                                "arc_challenge, openbookqa, 'all' or 'none'")
    limit: float | None = option(None, "zero-shot: only the first N documents of each task (a fraction if < 1)")
    data_dir: str | None = option(None, "data folder (default: $DMS_DATA_DIR, else ../shared/data beside the repository)")
    dtype: str = option("float32", "weights dtype of the evaluated models", choices=DTYPES)
    batch_size: int = option(8, "sequences per forward pass (perplexity batches are also capped at 8192 tokens)")
    seed: int = option(0, "seed of everything random (lm-eval's few-shot sampling, window order)")

    def __post_init__(self):
        if self.limit is not None and self.limit >= 1:
            self.limit = int(self.limit)  # a count of documents; below 1 a fraction of each task
        if self.batch_size < 1 or (self.max_windows is not None and self.max_windows < 1):
            raise ConfigError("--batch-size and --max-windows must be at least 1")


@dataclass
class EvalConfig(EvalOptions):
    """`dms-llm eval`."""

    model: str | None = option(None, "alias (smollm2-135m), Hub id, or local checkpoint folder", positional=True)
    source: str = option("auto", "datasets from the Hub or the data folder; auto = Hub when reachable",
                         choices=("auto", "local", "hub"))
    baseline: str | None = option(None, "a dense model evaluated in the same run, shown side by side")
    output: str | None = option(None, "results .json path or folder")
    overwrite: bool = option(False, "replace results of a different model at --output")
    device: str | None = option(None, "cpu, cuda, ... (default: the loader's choice)")
    trust_remote_code: bool = option(False, "for checkpoints with their own modeling code")
    no_progress: bool = option(False, "no progress bars")

    def __post_init__(self):
        if not self.model:
            raise ConfigError("give the model to evaluate: dms-llm eval MODEL_OR_DIR")
        super().__post_init__()


def parse_args(argv=None) -> EvalConfig:
    return _parse_config(EvalConfig, argv, __doc__, prog="dms-llm eval")


def model_identity(name: str) -> str:
    """Local folders are identified by their absolute path, anything else by the given name."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def default_output(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve() / "eval" / "results.json"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"
    return Path.cwd() / "outputs" / "eval" / safe / "results.json"


def main(argv=None) -> int:
    return exit_code(lambda: evaluate(parse_args(argv)))


def evaluate(args) -> int:
    from .. import evaluation as ev
    from ..checkpoints.loading import load_model_and_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.data_dir = data_dir_default(args.data_dir)
    # Everything that can be wrong in the arguments fails here, before minutes of model loading.
    ppl = ev.check_ppl_datasets(args.ppl)
    protocols = ev.check_protocols(args.protocol)
    tasks = ev.check_tasks(args.tasks)
    if not ppl and not tasks:
        raise ConfigError("nothing to evaluate: give --ppl and/or --tasks")
    if args.source == "local" or (args.source == "auto" and not ev.hub_reachable()):
        ev.resolve_data_dir(args.data_dir)  # the data folder will be needed: say so now if it is missing
    out = Path(args.output) if args.output else default_output(args.model)
    json_path = out if out.suffix == ".json" else out / "results.json"
    ev.check_output(json_path, model_identity(args.model), overwrite=args.overwrite)

    common = dict(ppl=ppl, protocols=protocols, tasks=tasks, data_dir=args.data_dir, limit=args.limit,
                  batch_size=args.batch_size, max_windows=args.max_windows, seed=args.seed, source=args.source,
                  progress=not args.no_progress)
    state: dict = {}
    # Only passed when asked for, so that a loader without the keyword still works.
    load_kwargs = dict(dtype=args.dtype, device=args.device)
    if args.trust_remote_code:
        load_kwargs["trust_remote_code"] = True

    def save(partial: dict, which: str) -> None:
        # Written after every part, so a long run that dies keeps what it measured.
        state[which] = partial
        if "main" not in state:
            return
        results = dict(state["main"], complete=False)
        if "baseline" in state:
            results["baseline"] = state["baseline"]
        ev.write_results(results, json_path, overwrite=True)

    for which, name in (("main", args.model), ("baseline", args.baseline)):
        if not name:
            continue
        t0 = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(name, **load_kwargs)
        load_s = time.perf_counter() - t0
        state[which] = ev.evaluate_model(model, tokenizer, model_name=model_identity(name),
                                         on_part_done=lambda r, which=which: save(r, which), **common)
        state[which]["time_s"]["load"] = round(load_s, 2)
        del model  # one model in memory at a time
        gc.collect()

    results = dict(state["main"], **({"baseline": state["baseline"]} if args.baseline else {}))
    results["complete"] = True
    path = ev.write_results(results, json_path, overwrite=True)
    rows = [results["baseline"], results] if args.baseline else [results]
    print(ev.results_markdown(rows))
    print(f"results: {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
