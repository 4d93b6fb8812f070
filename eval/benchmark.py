#!/usr/bin/env python
"""Side-by-side benchmark: dense, the one-shot baselines and DMS at the same parameter budgets.

    python eval/benchmark.py --model smollm2-135m --budgets 0.8,0.5 \
        --methods dense,magnitude,wanda-sp,llm-pruner,flap,shortgpt,dms,dms-lora \
        --ppl wikitext2,ptb --protocols llm-pruner --max-windows 320 \
        --dms-config recipes/smollm2-135m-default.yaml

Every pruned model is evaluated the same way (dms_llm.evaluation.evaluate_model), timed against the dense
model (dms_llm.speed, interleaved runs, medians), and its pruning/search wall time recorded. The one-shot
baselines (dms_llm.baselines) all calibrate on the same blocks (`--calib-dataset`, default the C4 train
sample; never an evaluation split). `dms` runs the DMS search with frozen weights, `dms-restarts` the best
of `--dms-restarts` such searches by held-out calibration loss (search.py --restarts), `dms-lora` one search
with LoRA and distillation from the unpruned model, all in-process (`dms_llm.search.run`) with the
`--dms-config` recipe (its budget replaced by each --budgets value; evaluation switched off there and done here).
`--recovery-steps N` adds, for every pruned model, a row fine-tuned for N steps (`dms_llm.finetune.run`,
LoRA + distillation, on the calibration dataset) with the same settings for every method.

Everything is cached under `--work` (default runs/benchmark/<model>): each (method, budget, recovery)
row is its own JSON in rows/, holding the plan or checkpoint path, the parameter count, the wall time
and every evaluation result keyed by its settings. A rerun, after an interruption or with more datasets
or tasks, computes only what is missing. Outputs: <out>/<model>.json, <model>.md and <model>.png.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BASELINES = ("magnitude", "wanda-sp", "llm-pruner", "flap", "shortgpt")
DMS_METHODS = ("dms", "dms-restarts", "dms-lora")
ALL_METHODS = ("dense",) + BASELINES + DMS_METHODS
# dms-restarts costs --dms-restarts searches per budget, so it runs only when asked for.
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m != "dms-restarts")
ROW_FORMAT = "dms_benchmark_row/1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, Hub id or local folder (default: smollm2-135m)")
    p.add_argument("--budgets", default="0.8", help="comma list of kept-parameter fractions, e.g. 0.8,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {','.join(ALL_METHODS)} (default: all but dms-restarts)")
    p.add_argument("--calib-dataset", default="default", help="calibration text of the baselines (data.load_calibration)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration blocks of the baselines")
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
                   help="use a finished DMS search folder (dms_llm/search.py --output-dir) for that row instead of "
                        "searching, e.g. dms@0.8=runs/smollm2-80; repeatable")
    p.add_argument("--skip", action="append", default=[], metavar="METHOD@BUDGET",
                   help="leave this row out (e.g. dms-lora@0.5 when that search is too long for the machine); repeatable")
    p.add_argument("--recovery-steps", type=int, default=0, help="also fine-tune every pruned model for N steps")
    p.add_argument("--recovery-config", default=None,
                   help="fine-tuning recipe (YAML, dms_llm/finetune.py options) of the recovery rows; its model, "
                        "output and step count are set here. Default: LoRA + distillation on the calibration dataset")
    p.add_argument("--speed-reps", type=int, default=5, help="timed runs per model for prefill/decode speed (0: skip)")
    p.add_argument("--speed-seq-len", type=int, default=128, help="prefill length of the speed test")
    p.add_argument("--speed-new-tokens", type=int, default=32, help="decode steps of the speed test (after 32 prompt tokens)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $DMS_DATA_DIR or ../shared/data)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights dtype of the evaluations and the baselines' calibration")
    p.add_argument("--train-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype of the DMS searches and the recovery fine-tuning: auto = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", default="auto", help="where models are evaluated and baselines calibrate: auto (cuda when "
                                                    "available), cpu, cuda, cuda:1 ... (searches and fine-tuning use Accelerate's device)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward in calibration and evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO_ROOT / "eval" / "results"), help="folder of <model>.json/.md/.png")
    p.add_argument("--work", default=None, help="cache folder (default: runs/benchmark/<model>)")
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
            p.error(f"--adopt {spec!r}: {folder} holds no search_summary.json (not a finished dms_llm/search.py run)")
        if method == "dms-restarts":
            searches = _restarts_of(folder)
            if searches != args.dms_restarts:
                p.error(f"--adopt {spec!r}: a dms-restarts row needs a search.py --restarts {args.dms_restarts} run; "
                        f"{folder} holds {searches or 'no restarts.json, so one search'}")
        args.adopted[(method, budget)] = os.path.abspath(folder)
    args.label = Path(args.model.rstrip("/")).name if os.path.isdir(args.model) else args.model.replace("/", "--")
    args.work = os.path.abspath(args.work or REPO_ROOT / "runs" / "benchmark" / args.label)
    return args


def _restarts_of(folder: str) -> int | None:
    """How many searches a finished search.py --restarts run compared (None: not a restarts run)."""
    from dms_llm.restarts import RECORD_FILE

    path = os.path.join(folder, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return len(json.load(f)["searches"])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


class Benchmark:
    def __init__(self, args):
        self.args = args
        self._dense = None
        self._tok = None
        self._blocks = None
        self.dms_recipe = None
        self.recovery_recipe = None
        if args.dms_config:
            from dms_llm.search import load_recipe

            self.dms_recipe = load_recipe(args.dms_config)
        if args.recovery_config:
            from dms_llm.cli import load_recipe
            from dms_llm.finetune import FinetuneConfig

            self.recovery_recipe = load_recipe(args.recovery_config, FinetuneConfig)

    # ----- lazily loaded inputs -----------------------------------------------------------------
    def dense(self):
        if self._dense is None:
            from dms_llm.loading import load_model_and_tokenizer

            print(f"[benchmark] loading {self.args.model} ({self.args.dtype})", flush=True)
            self._dense, self._tok = load_model_and_tokenizer(self.args.model, dtype=self.args.dtype, device=self.args.device)
        return self._dense

    def tokenizer(self):
        self.dense()
        return self._tok

    def calibration(self):
        if self._blocks is None:
            from dms_llm.data import load_calibration

            a = self.args
            self._blocks = load_calibration(a.calib_dataset, self.tokenizer(), a.seq_len, a.calib_samples, seed=a.seed,
                                            data_dir=a.data_dir)
        return self._blocks

    # ----- row identity -------------------------------------------------------------------------
    def identity(self, method: str, budget: float, recovery: int) -> dict:
        a = self.args
        ident = {"model": a.model, "dtype": a.dtype, "method": method, "budget": budget}
        if method in BASELINES:
            from dms_llm.baselines import VERSIONS

            ident.update(calib=[a.calib_dataset, a.calib_samples, a.seq_len, a.seed])
            if VERSIONS[method] > 1:  # version 1 is left out so that the first cached rows stay valid
                ident.update(version=VERSIONS[method])
        if (method, budget) in a.adopted:
            with open(os.path.join(a.adopted[(method, budget)], "search_summary.json")) as f:
                ident.update(adopted=a.adopted[(method, budget)], summary=_digest(json.load(f)))
        elif method in DMS_METHODS:
            ident.update(recipe=self.dms_recipe, seed=a.seed)
            if method == "dms-restarts":
                ident.update(restarts=a.dms_restarts)
            if self.dms_recipe is None:  # the search then calibrates like the baselines
                ident.update(calib=[a.calib_dataset, a.calib_samples, a.seq_len])
        if a.train_dtype != "auto" and (method in DMS_METHODS or recovery):  # left out at auto: earlier rows stay valid
            ident.update(train_dtype=a.train_dtype)
        if recovery:
            ident.update(recovery_steps=recovery, recovery_data=[a.calib_dataset, a.calib_samples, a.seq_len, a.seed])
            if self.recovery_recipe is not None:
                ident.update(recovery_recipe=self.recovery_recipe)
        return ident

    def row_name(self, method: str, budget: float, recovery: int) -> str:
        tag = "dense" if method == "dense" else f"{method}-b{budget:g}" + (f"-rec{recovery}" if recovery else "")
        return f"{tag}-{_digest(self.identity(method, budget, recovery))}"

    def row_path(self, name: str) -> str:
        return os.path.join(self.args.work, "rows", name + ".json")

    def load_row(self, method: str, budget: float, recovery: int) -> dict:
        name = self.row_name(method, budget, recovery)
        path = self.row_path(name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {"format": ROW_FORMAT, "name": name, "identity": self.identity(method, budget, recovery), "method": method,
                "budget": budget, "recovery": bool(recovery), "params": None, "time_s": None, "artifact": None,
                "ppl": {}, "zero_shot": {}, "speed": {}}

    def save_row(self, row: dict) -> None:
        _write_json(self.row_path(row["name"]), row)

    # ----- building pruned models ---------------------------------------------------------------
    def target(self, budget: float) -> int:
        from dms_llm.plan import PrunePlan, count_plan_parameters

        return int(budget * count_plan_parameters(PrunePlan.dense(self.dense().config)))

    def build(self, row: dict) -> None:
        method, budget = row["method"], row["budget"]
        work = self.args.work
        if method == "dense":
            from dms_llm.evaluation import count_params

            row.update(params=count_params(self.dense()), time_s=0.0, artifact=None)
        elif row["recovery"]:
            self.build_recovered(row)
        elif method in BASELINES:
            from dms_llm.baselines import METHODS

            blocks = self.calibration()
            print(f"[benchmark] {method} at {budget:g}: computing the plan", flush=True)
            start = time.perf_counter()
            plan = METHODS[method](self.dense(), blocks, self.target(budget), source_model=self.args.model)
            seconds = time.perf_counter() - start
            path = os.path.join(work, "plans", row["name"] + ".json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            plan.metadata["time_s"] = seconds
            plan.to_json(path)
            row.update(params=plan.params_after, time_s=seconds, artifact=os.path.relpath(path, work),
                       info={k: v for k, v in plan.metadata.items() if k not in ("block_influence",)})
        else:
            self.build_dms(row)
        if method != "dense" and not (row.get("info") or {}).get("adopted"):
            note_machine(row, "build")  # where the plan, search or fine-tuning ran
        self.save_row(row)

    def build_dms(self, row: dict) -> None:
        from dms_llm.search import SearchConfig, resumable, run

        a = self.args
        adopted = a.adopted.get((row["method"], row["budget"]))
        if adopted:
            with open(os.path.join(adopted, "search_summary.json")) as f:
                summary = json.load(f)
            target = self.target(row["budget"])
            if int(summary["target_params"]) != target or int(summary["params"]) > target:
                raise RuntimeError(f"--adopt {adopted}: its target is {summary['target_params']:,} parameters, the "
                                   f"budget {row['budget']:g} here means {target:,}; adopt a run made for this budget")
            settings_path = os.path.join(adopted, "search_config.json")
            settings = json.load(open(settings_path)) if os.path.isfile(settings_path) else None
            row.update(params=int(summary["params"]), time_s=float(summary["search_time_s"]), artifact=adopted,
                       info={"adopted": adopted, "dms_settings": settings})
            return
        out = os.path.join(a.work, "dms", row["name"])
        values = dict(self.dms_recipe or {"dataset": a.calib_dataset, "seq_len": a.seq_len, "num_samples": a.calib_samples})
        values.update(model=a.model, target_ratio=row["budget"], target_params=None, output_dir=out, no_eval=True,
                      push_to_hub=None, seed=a.seed, stop_after=None, dtype=a.train_dtype)
        if a.data_dir:
            values["data_dir"] = a.data_dir
        if row["method"] == "dms-lora":
            values.update(train_weights="lora", distill=True)
        else:
            values["train_weights"] = "none"
        if row["method"] == "dms-restarts":
            values["restarts"] = a.dms_restarts
        summary_path = os.path.join(out, "search_summary.json")
        if not os.path.isfile(summary_path):
            resume = resumable(out)
            values.update(resume=resume, overwrite=not resume)
            print(f"[benchmark] {row['method']} at {row['budget']:g}: DMS search ({'resuming' if resume else 'starting'}) in {out}", flush=True)
            summary = run(SearchConfig(**values))
            if not summary.get("finished"):
                raise RuntimeError(f"the DMS search in {out} stopped before the end; rerun the benchmark to resume it")
        with open(summary_path) as f:
            summary = json.load(f)
        row.update(params=int(summary["params"]), time_s=float(summary["search_time_s"]),
                   artifact=os.path.relpath(out, a.work), info={"dms_settings": {k: v for k, v in values.items() if k != "model"},
                                                                "train_dtype": summary.get("dtype")})

    def checkpoint_of(self, base: dict) -> str:
        """A saved checkpoint folder of a pruned row (fine-tuning reads a folder)."""
        work = self.args.work
        if base["method"] in DMS_METHODS:
            folder = os.path.join(work, base["artifact"])
            if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
                raise RuntimeError(f"the {base['method']} search folder {folder} holds no weights (copied without "
                                   f"them?); delete {self.row_path(base['name'])} to search again")
            return folder
        folder = os.path.join(work, "models", base["name"])
        if not os.path.isfile(os.path.join(folder, "config.json")):
            from dms_llm.save import save_pruned

            model, plan = self.materialize(base, with_plan=True)
            save_pruned(model, self.tokenizer(), folder, plan, overwrite=True,
                        source_dir=self.args.model if os.path.isdir(self.args.model) else None)
        return folder

    def build_recovered(self, row: dict) -> None:
        try:
            from dms_llm.finetune import FinetuneConfig, run
        except ImportError as e:
            raise RuntimeError(f"--recovery-steps needs dms_llm.finetune (FinetuneConfig, run), which failed to import: {e}") from e
        a = self.args
        base = self.ensure_built(row["method"], row["budget"], 0)
        pruned_dir = self.checkpoint_of(base)
        out = os.path.join(a.work, "recovered", row["name"])
        summary_path = os.path.join(out, "benchmark_recovery.json")
        if not os.path.isfile(os.path.join(out, "config.json")) or not os.path.isfile(summary_path):
            resume = os.path.isfile(os.path.join(out, "finetune_state", "state.pt"))
            print(f"[benchmark] {row['method']} at {row['budget']:g}: recovery fine-tuning, {a.recovery_steps} steps", flush=True)
            values = dict(self.recovery_recipe or dict(dataset=a.calib_dataset, seq_len=a.seq_len, num_samples=a.calib_samples))
            values.pop("epochs", None)  # --recovery-steps sets the length
            values.update(model=pruned_dir, teacher=a.model, output_dir=out, steps=a.recovery_steps, seed=a.seed,
                          dtype=a.train_dtype, no_eval=True, resume=resume, overwrite=not resume, push_to_hub=None)
            if a.data_dir:
                values["data_dir"] = a.data_dir
            cfg = FinetuneConfig(**values)
            summary = run(cfg)
            if not summary.get("finished"):
                raise RuntimeError(f"recovery fine-tuning in {out} stopped before the end; rerun to resume it")
            _write_json(summary_path, {k: v for k, v in summary.items() if k != "results"})
        with open(summary_path) as f:
            summary = json.load(f)
        row.update(params=int(summary["params"]), time_s=float(base["time_s"]) + float(summary["train_time_s"]),
                   artifact=os.path.relpath(out, a.work), info={"recovery": {k: summary.get(k) for k in ("method", "steps", "teacher", "lr", "train_time_s", "dtype")}})

    def ensure_built(self, method: str, budget: float, recovery: int) -> dict:
        row = self.load_row(method, budget, recovery)
        if row["params"] is None:
            self.build(row)
        return row

    def materialize(self, row: dict, with_plan: bool = False):
        """The row's model in memory: the dense model, a baseline plan applied to it, or a saved checkpoint."""
        if row["method"] == "dense":
            return self.dense()
        path = os.path.join(self.args.work, row["artifact"])
        if row["method"] in BASELINES and not row["recovery"]:
            from dms_llm.plan import PrunePlan
            from dms_llm.prune import prune_model

            plan = PrunePlan.from_json(path)
            model = prune_model(self.dense(), plan)
            return (model, plan) if with_plan else model
        from dms_llm.loading import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(path, dtype=self.args.dtype, device=self.args.device)
        return model

    # ----- evaluation ---------------------------------------------------------------------------
    def ppl_key(self, dataset: str, protocol: str) -> str:
        return f"{dataset}|{protocol}|mw={self.args.max_windows}"

    def task_key(self, task: str) -> str:
        return f"{task}|limit={self.args.limit}"

    def speed_key(self) -> str:
        a = self.args
        return f"reps={a.speed_reps}|prefill={a.speed_seq_len}|decode=32+{a.speed_new_tokens}"

    def missing(self, row: dict) -> tuple[list, list, bool]:
        a = self.args
        ppl = [d for d in a.ppl if any(self.ppl_key(d, p) not in row["ppl"] for p in a.protocols)]
        tasks = [t for t in a.tasks if self.task_key(t) not in row["zero_shot"]]
        speed = a.speed_reps > 0 and row["method"] != "dense" and self.speed_key() not in row["speed"]
        return ppl, tasks, speed

    def evaluate(self, row: dict) -> None:
        ppl, tasks, speed = self.missing(row)
        if speed and row["recovery"]:
            # Fine-tuning keeps every shape, and speed depends on shapes only: reuse the pruned row's timing.
            base = self.load_row(row["method"], row["budget"], 0)
            timing = base["speed"].get(self.speed_key())
            if timing:
                row["speed"][self.speed_key()] = {**timing, "measured_on": base["name"]}
                self.save_row(row)
                speed = False
        if not (ppl or tasks or speed):
            return
        a = self.args
        model = self.materialize(row)
        if ppl or tasks:
            from dms_llm.evaluation import evaluate_model

            def record(results: dict) -> None:
                for label, by_protocol in results.get("ppl_details", {}).items():
                    for protocol, detail in by_protocol.items():
                        row["ppl"][self.ppl_key(detail["dataset"], protocol)] = {"label": label, "value": detail["ppl"],
                                                                                 "n_windows": detail.get("n_windows")}
                for task, metrics in results.get("zero_shot", {}).items():
                    row["zero_shot"][self.task_key(task)] = metrics
                if results.get("ppl_details"):
                    note_machine(row, "ppl")
                if results.get("zero_shot"):
                    note_machine(row, "zero_shot")
                self.save_row(row)

            print(f"[benchmark] evaluating {row['name']}: ppl {ppl or '-'} tasks {tasks or '-'}", flush=True)
            evaluate_model(model, self.tokenizer(), ppl=ppl, protocols=a.protocols, tasks=tasks, data_dir=a.data_dir,
                           limit=a.limit, batch_size=a.batch_size, max_windows=a.max_windows, seed=a.seed,
                           model_name=row["name"], progress=False, on_part_done=record)
        if speed:
            from dms_llm.speed import relative_speed

            print(f"[benchmark] timing {row['name']} against dense", flush=True)
            res = relative_speed({"dense": self.dense(), "pruned": model}, reference="dense", reps=a.speed_reps,
                                 seq_len=a.speed_seq_len, new_tokens=a.speed_new_tokens)
            row["speed"][self.speed_key()] = {**res["models"]["pruned"], "dense": res["models"]["dense"], "settings": res["settings"]}
            note_machine(row, "speed")
            self.save_row(row)

    # ----- the report ---------------------------------------------------------------------------
    def report_row(self, row: dict) -> dict:
        a = self.args
        ppl: dict = {}
        for d in a.ppl:
            for p in a.protocols:
                hit = row["ppl"].get(self.ppl_key(d, p))
                if hit:
                    ppl.setdefault(hit["label"], {})[p] = hit["value"]
        zs = {}
        for t in a.tasks:
            m = row["zero_shot"].get(self.task_key(t))
            if m:
                zs[t] = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith("n")}
        values = [row["zero_shot"][self.task_key(t)].get("value") for t in a.tasks if self.task_key(t) in row["zero_shot"]]
        avg = sum(values) / len(values) if values and len(values) == len(a.tasks) and None not in values else None
        sp = row["speed"].get(self.speed_key()) or {}
        dense_speed = 1.0 if row["method"] == "dense" else None
        return {"method": row["method"], "budget": row["budget"], "recovery": row["recovery"], "params": row["params"],
                "ppl": ppl, "zero_shot": zs, "zero_shot_avg": avg,
                "prefill_speedup": sp.get("prefill_speedup", dense_speed), "decode_speedup": sp.get("decode_speedup", dense_speed),
                "time_s": row["time_s"], "machines": row.get("machines", {})}


def note_machine(row: dict, part: str) -> None:
    """Which machine measured this part of the row (ppl, zero_shot, speed): a cache can be filled on several."""
    row.setdefault("machines", {})[part] = machine()


@functools.lru_cache(maxsize=1)
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{cpu}; {os.cpu_count()} logical CPUs; {device}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def _cell(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    rows = report["rows"]
    dense = next((r["params"] for r in rows if r["method"] == "dense"), None)
    ppl_cols = list(dict.fromkeys((d, p) for r in rows for d, by in r["ppl"].items() for p in by))
    tasks = list(dict.fromkeys(t for r in rows for t in r["zero_shot"]))
    head = ["method", "budget", "recovery", "params (M)", "% dense"] + [f"{d} ppl ({p})" for d, p in ppl_cols]
    head += tasks + (["zero-shot avg"] if tasks else []) + ["prefill ×", "decode ×", "prune time (s)"]
    machines = report.get("machines") or {}
    where = [f"Machine: {report['machine']}"] if len({m for ms in machines.values() for m in ms} | {report["machine"]}) == 1 else [
        "Machines (by what they measured): " + "; ".join(f"{part}: {' / '.join(ms)}" for part, ms in machines.items())]
    lines = [f"# Benchmark: {report['model']}", ""] + where + ["", "```bash", report["command"], "```", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = [r["method"], "–" if r["method"] == "dense" else f"{r['budget']:g}", "yes" if r["recovery"] else "no",
             _cell(r["params"] / 1e6 if r["params"] else None), _cell(100 * r["params"] / dense if dense and r["params"] else None, "{:.1f}")]
        c += [_cell(r["ppl"].get(d, {}).get(p)) for d, p in ppl_cols]
        c += [_cell(100 * r["zero_shot"][t]["value"] if r["zero_shot"].get(t, {}).get("value") is not None else None) for t in tasks]
        if tasks:
            c.append(_cell(100 * r["zero_shot_avg"] if r["zero_shot_avg"] is not None else None))
        c += [_cell(r["prefill_speedup"]), _cell(r["decode_speedup"]), _cell(r["time_s"], "{:.1f}")]
        lines.append("| " + " | ".join(c) + " |")
    lines += ["", "Perplexity: dms_llm.evaluation (non-overlapping windows; llm-pruner = 128 tokens)"
              + (f", first {report['settings']['max_windows']} windows only" if report["settings"].get("max_windows") else "")
              + ((". Zero-shot: lm-eval 0-shot accuracy in %" + (f" on the first {report['settings']['limit']} documents per task"
                                                                   if report["settings"].get("limit") else "")) if tasks else "")
              + ". Speed: tokens/s relative to dense (interleaved runs, medians; prefill batch 1, decode batch 1 with KV cache)."
              + " Prune time: wall time of the plan (baselines, calibration pass included) or of the DMS search loop;"
              + " with recovery, plus the fine-tuning."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    dense_params = dense["params"] if dense else max(r["params"] or 0 for r in rows)
    first = next(((d, p) for r in rows for d, by in r["ppl"].items() for p in by), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, what in zip(axes, ("ppl", "zs")):
        for m in methods:
            for rec in (False, True):
                pts = sorted((r["params"] / dense_params, r) for r in rows if r["method"] == m and r["recovery"] == rec and r["params"])
                ys = [(x, (r["ppl"].get(first[0], {}).get(first[1]) if first else None) if what == "ppl" else r["zero_shot_avg"]) for x, r in pts]
                ys = [(x, y if what == "ppl" else 100 * y) for x, y in ys if y is not None]
                if ys:
                    ax.plot(*zip(*ys), marker="o", ls="--" if rec else "-", color=colors[m], label=m + (" + recovery" if rec else ""))
        ref = None
        if dense is not None:
            ref = (dense["ppl"].get(first[0], {}).get(first[1]) if first else None) if what == "ppl" else (
                100 * dense["zero_shot_avg"] if dense["zero_shot_avg"] is not None else None)
        if ref is not None:
            ax.plot([1.0], [ref], marker="*", ms=12, color="k", ls="", label="dense")
        ax.set_xlabel("parameters (fraction of dense)")
        if what == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel(f"{first[0]} perplexity ({first[1]})" if first else "perplexity")
        else:
            ax.set_ylabel("zero-shot average accuracy (%)")
            if not any(r["zero_shot_avg"] is not None for r in rows):
                ax.text(0.5, 0.5, "no zero-shot tasks run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    legend = {}  # one legend for both panels, beside them: inside, it hid points
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.suptitle(f"{report['model']}: structured pruning at equal parameter budgets")
    fig.tight_layout(rect=(0, 0, 0.85 if legend else 1, 1))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=8)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(bench: Benchmark, rows: list[dict], argv) -> dict:
    a = bench.args
    by_part: dict = {}
    for r in rows:
        for part, name in r.get("machines", {}).items():
            by_part.setdefault(part, set()).add(name)
    report = {"model": a.model, "machine": machine(), "machines": {k: sorted(v) for k, v in sorted(by_part.items())},
              "command": "python eval/benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "settings": {k: getattr(a, k) for k in ("budgets", "methods", "calib_dataset", "calib_samples", "seq_len", "ppl",
                                                       "protocols", "max_windows", "tasks", "limit", "dms_config", "dms_restarts",
                                                       "recovery_steps", "recovery_config", "speed_reps", "dtype", "train_dtype",
                                                       "device", "seed")},
              "rows": [bench.report_row(r) for r in rows]}
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, a.label)
    _write_json(base + ".json", report)
    with open(base + ".md.tmp", "w") as f:
        f.write(markdown(report))
    os.replace(base + ".md.tmp", base + ".md")
    plot(report, base + ".png")
    return report


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
    from dms_llm.cli import exit_code

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


if __name__ == "__main__":
    sys.exit(main())
