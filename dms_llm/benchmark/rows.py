"""The benchmark's rows: one cached JSON per (method, budget, recovery), built once and evaluated as far
as asked. The one-shot baselines are plans applied to the dense model; the DMS rows and the recovery
fine-tuning run the `dms-llm search` / `dms-llm finetune` commands (each with a recipe written beside its
folder), so their folders are exactly what those commands write and `--adopt` takes a folder made
either way."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from ..files import read_json, write_json_atomic, write_text_atomic
from .report import note_machine

BASELINES = ("magnitude", "wanda-sp", "llm-pruner", "flap", "shortgpt")
DMS_METHODS = ("dms", "dms-restarts", "dms-lora")
ALL_METHODS = ("dense",) + BASELINES + DMS_METHODS
# dms-restarts costs --dms-restarts searches per budget, so it runs only when asked for.
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m != "dms-restarts")
ROW_FORMAT = "dms_benchmark_row/1"


@dataclass(frozen=True)
class PPLCell:
    """One perplexity measurement asked of the rows: a dataset under a protocol, on the first `max_windows`
    windows (None: the whole split), for the pruned rows at `budgets` only (None: every row). The dense row,
    the reference, gets every cell."""

    dataset: str
    protocol: str
    max_windows: int | None = None
    budgets: tuple[float, ...] | None = None
    column: str = ""  # the report's key under the dataset's label (the protocol, unless two cells share it)

    def applies(self, method: str, budget: float) -> bool:
        return self.budgets is None or method == "dense" or any(abs(budget - b) < 1e-9 for b in self.budgets)

    def describe(self) -> str:
        windows = "the whole split" if self.max_windows is None else f"the first {self.max_windows} windows"
        rows = "" if self.budgets is None else " (budget " + ", ".join(f"{b:g}" for b in self.budgets) + " rows and dense)"
        return f"{self.dataset} {self.protocol} ({self.column}): {windows}{rows}"


def parse_ppl_extra(spec: str) -> list[PPLCell]:
    """`DATASETS:PROTOCOL[:WINDOWS[:BUDGETS]]`, e.g. `wikitext2,ptb:sparsegpt:all:0.8`: WINDOWS a number or
    `all` (the whole split, the default), BUDGETS a comma list (default: every budget)."""
    from ..evaluation.perplexity import check_ppl_datasets, check_protocols

    parts = spec.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"--ppl-extra {spec!r}: expected DATASETS:PROTOCOL[:WINDOWS[:BUDGETS]], "
                         "e.g. wikitext2,ptb:sparsegpt:all:0.8")
    datasets, protocols = check_ppl_datasets(parts[0]), check_protocols(parts[1])
    if not datasets or len(protocols) != 1:
        raise ValueError(f"--ppl-extra {spec!r}: name at least one dataset and exactly one protocol")
    windows = parts[2].strip() if len(parts) > 2 else "all"
    if windows in ("", "all"):
        max_windows = None
    else:
        try:
            max_windows = int(windows)
        except ValueError:
            max_windows = 0
        if max_windows < 1:
            raise ValueError(f"--ppl-extra {spec!r}: WINDOWS must be a positive number or 'all', got {windows!r}")
    budgets = None
    if len(parts) > 3 and parts[3].strip() not in ("", "all"):
        try:
            budgets = tuple(float(b) for b in parts[3].split(",") if b.strip())
        except ValueError:
            raise ValueError(f"--ppl-extra {spec!r}: BUDGETS must be a comma list of fractions") from None
    return [PPLCell(d, protocols[0], max_windows, budgets) for d in datasets]


def ppl_cells(ppl, protocols, max_windows, extra) -> list[PPLCell]:
    """The perplexity cells of a benchmark: every --ppl dataset under every --protocols protocol on
    --max-windows windows for every row, then the --ppl-extra cells. A column is named by its protocol;
    an extra cell whose dataset and protocol a main cell already has is named `PROTOCOL@WINDOWS`."""
    cells = [PPLCell(d, p, max_windows, None, p) for d in ppl for p in protocols]
    for cell in extra:
        same = [c for c in cells if (c.dataset, c.protocol) == (cell.dataset, cell.protocol)]
        if any(c.max_windows == cell.max_windows for c in same):
            continue  # already measured for every row
        column = cell.protocol if not same else f"{cell.protocol}@{cell.max_windows or 'all'}"
        cells.append(PPLCell(cell.dataset, cell.protocol, cell.max_windows, cell.budgets, column))
    return cells


def run_command(name: str, values: dict, config_path: str) -> None:
    """`dms-llm NAME --config CONFIG_PATH`, with `values` written as that recipe."""
    import yaml

    from ..commands import main

    write_text_atomic(config_path, yaml.safe_dump(values, sort_keys=True))
    code = main([name, "--config", config_path])
    if code != 0:
        raise RuntimeError(f"`dms-llm {name} --config {config_path}` ended with exit code {code} (its message is above)")


def _restarts_of(folder: str) -> int | None:
    """How many searches a finished `dms-llm search --restarts` run compared (None: not a restarts run)."""
    from ..cli.restarts import RECORD_FILE

    path = os.path.join(folder, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return len(json.load(f)["searches"])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Benchmark:
    def __init__(self, args):
        self.args = args
        self._dense = None
        self._tok = None
        self._blocks = None
        self.dms_recipe = None
        self.recovery_recipe = None
        if args.dms_config:
            from ..cli.search import load_recipe

            self.dms_recipe = load_recipe(args.dms_config)
        if args.recovery_config:
            from ..cli.finetune import load_recipe

            self.recovery_recipe = load_recipe(args.recovery_config)
        self.ppl_cells = getattr(args, "ppl_cells", None) or ppl_cells(args.ppl, args.protocols, args.max_windows, [])

    # ----- lazily loaded inputs -----------------------------------------------------------------
    def dense(self):
        if self._dense is None:
            from ..checkpoints import load_model_and_tokenizer

            print(f"[benchmark] loading {self.args.model} ({self.args.dtype})", flush=True)
            self._dense, self._tok = load_model_and_tokenizer(self.args.model, dtype=self.args.dtype, device=self.args.device)
        return self._dense

    def tokenizer(self):
        self.dense()
        return self._tok

    def calibration(self):
        if self._blocks is None:
            from ..data import load_calibration

            a = self.args
            self._blocks = load_calibration(a.calib_dataset, self.tokenizer(), a.seq_len, a.calib_samples, seed=a.seed,
                                            data_dir=a.data_dir)
        return self._blocks

    # ----- row identity -------------------------------------------------------------------------
    def seeds(self, method: str) -> list[int]:
        """The rows a method has per budget: one per --dms-seeds seed for `dms`, else one (--seed)."""
        a = self.args
        return list(getattr(a, "dms_seeds", None) or [a.seed]) if method == "dms" else [a.seed]

    def adopted_folder(self, method: str, budget: float, seed: int | None = None) -> str | None:
        a = self.args
        seed = a.seed if seed is None else seed
        return a.adopted.get((method, budget, seed)) or (a.adopted.get((method, budget)) if seed == a.seed else None)

    def identity(self, method: str, budget: float, recovery: int, seed: int | None = None) -> dict:
        a = self.args
        seed = a.seed if seed is None else seed
        ident = {"model": a.model, "dtype": a.dtype, "method": method, "budget": budget}
        if method in BASELINES:
            from ..baselines import VERSIONS

            ident.update(calib=[a.calib_dataset, a.calib_samples, a.seq_len, a.seed])
            if VERSIONS[method] > 1:  # version 1 is left out so that the first cached rows stay valid
                ident.update(version=VERSIONS[method])
        adopted = self.adopted_folder(method, budget, seed)
        if adopted:
            with open(os.path.join(adopted, "search_summary.json")) as f:
                ident.update(adopted=adopted, summary=_digest(json.load(f)))
        elif method in DMS_METHODS:
            ident.update(recipe=self.dms_recipe, seed=seed)  # a dms row per --dms-seeds seed; the others --seed
            if method == "dms-restarts":
                ident.update(restarts=a.dms_restarts)
            if self.dms_recipe is None:  # the search then calibrates like the baselines
                ident.update(calib=[a.calib_dataset, a.calib_samples, a.seq_len])
        if a.align != 1 and method != "dense":  # left out at 1: rows made before alignment stay valid
            ident.update(align=a.align)
        if a.train_dtype != "auto" and (method in DMS_METHODS or recovery):  # left out at auto: earlier rows stay valid
            ident.update(train_dtype=a.train_dtype)
        if recovery:
            ident.update(recovery_steps=recovery, recovery_data=[a.calib_dataset, a.calib_samples, a.seq_len, a.seed])
            if self.recovery_recipe is not None:
                ident.update(recovery_recipe=self.recovery_recipe)
        return ident

    def row_name(self, method: str, budget: float, recovery: int, seed: int | None = None) -> str:
        seed = self.args.seed if seed is None else seed
        # A dms row of another seed than 0 says so (the seed-0 row keeps the name rows had before --dms-seeds).
        tag = "dms" + (f"-seed{seed}" if seed != 0 else "") if method == "dms" else method
        tag = "dense" if method == "dense" else f"{tag}-b{budget:g}" + (f"-rec{recovery}" if recovery else "")
        return f"{tag}-{_digest(self.identity(method, budget, recovery, seed))}"

    def row_path(self, name: str) -> str:
        return os.path.join(self.args.work, "rows", name + ".json")

    def load_row(self, method: str, budget: float, recovery: int, seed: int | None = None) -> dict:
        seed = self.args.seed if seed is None else seed
        name = self.row_name(method, budget, recovery, seed)
        path = self.row_path(name)
        if os.path.isfile(path):
            with open(path) as f:
                row = json.load(f)
            row.setdefault("seed", seed)  # rows cached before rows recorded their seed
            row.setdefault("llamacpp", {})
            return row
        return {"format": ROW_FORMAT, "name": name, "identity": self.identity(method, budget, recovery, seed), "method": method,
                "budget": budget, "recovery": bool(recovery), "seed": seed, "params": None, "time_s": None, "artifact": None,
                "ppl": {}, "zero_shot": {}, "speed": {}, "llamacpp": {}}

    def save_row(self, row: dict) -> None:
        write_json_atomic(self.row_path(row["name"]), row)

    # ----- building pruned models ---------------------------------------------------------------
    def target(self, budget: float) -> int:
        from ..budget import ParameterCounter

        return int(budget * ParameterCounter(self.dense()).dense())

    def build(self, row: dict) -> None:
        method, budget = row["method"], row["budget"]
        work = self.args.work
        if method == "dense":
            from ..checkpoints import count_parameters

            row.update(params=count_parameters(self.dense()), time_s=0.0, artifact=None)
        elif row["recovery"]:
            self.build_recovered(row)
        elif method in BASELINES:
            from ..baselines import METHODS

            blocks = self.calibration()
            print(f"[benchmark] {method} at {budget:g}: computing the plan", flush=True)
            start = time.perf_counter()
            plan = METHODS[method](self.dense(), blocks, self.target(budget), source_model=self.args.model,
                                   align=self.args.align)
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
        self.describe(row)
        self.save_row(row)

    def describe(self, row: dict) -> bool:
        """Fills what every row records beside its results: `seed`, `dtype` (evaluation), `train_dtype`
        (search or fine-tuning), `calib_tokens` (the calibration text of the pruning: blocks x tokens) and,
        for a recovered row, `recovery_tokens`. Rows cached before these fields get them here. True when
        something was added."""
        a = self.args
        before = {k: row.get(k) for k in ("seed", "dtype", "train_dtype", "calib_tokens", "recovery_tokens")}
        ident, info = row.get("identity") or {}, row.get("info") or {}
        row.setdefault("dtype", ident.get("dtype", a.dtype))
        if row["method"] == "dense":
            row.setdefault("calib_tokens", 0)
        elif row["method"] in BASELINES and not row["recovery"]:
            calib = ident.get("calib") or [None, a.calib_samples, a.seq_len, a.seed]
            row.setdefault("calib_tokens", int(calib[1]) * int(calib[2]))
        elif row["method"] in DMS_METHODS and not row["recovery"] and row.get("artifact"):
            folder = os.path.join(a.work, row["artifact"])
            settings = info.get("dms_settings") or {}
            config_path = os.path.join(folder, "search_config.json")
            if os.path.isfile(config_path):
                settings = read_json(config_path)
            if settings.get("num_samples") and settings.get("seq_len"):
                row.setdefault("calib_tokens", int(settings["num_samples"]) * int(settings["seq_len"]))
                if settings.get("heldout_samples"):
                    row.setdefault("heldout_tokens", int(settings["heldout_samples"]) * int(settings["seq_len"]))
            if info.get("train_dtype"):
                row.setdefault("train_dtype", info["train_dtype"])
        elif row["recovery"]:
            base = self.load_row(row["method"], row["budget"], 0, row.get("seed"))
            if base["params"] is not None:
                self.describe(base)
                if base.get("calib_tokens") is not None:
                    row.setdefault("calib_tokens", base["calib_tokens"])
            summary_path = os.path.join(a.work, row["artifact"], "finetune_summary.json") if row.get("artifact") else None
            if summary_path and os.path.isfile(summary_path):
                summary = read_json(summary_path)
                if summary.get("tokens") is not None:
                    row.setdefault("recovery_tokens", int(summary["tokens"]))
            if (info.get("recovery") or {}).get("dtype"):
                row.setdefault("train_dtype", info["recovery"]["dtype"])
        return before != {k: row.get(k) for k in before}

    def build_dms(self, row: dict) -> None:
        a = self.args
        seed = row.get("seed", a.seed)
        adopted = self.adopted_folder(row["method"], row["budget"], seed)
        if adopted:
            summary = read_json(os.path.join(adopted, "search_summary.json"))
            target = self.target(row["budget"])
            if int(summary["target_params"]) != target or int(summary["params"]) > target:
                raise RuntimeError(f"--adopt {adopted}: its target is {summary['target_params']:,} parameters, the "
                                   f"budget {row['budget']:g} here means {target:,}; adopt a run made for this budget")
            settings_path = os.path.join(adopted, "search_config.json")
            settings = read_json(settings_path) if os.path.isfile(settings_path) else None
            row.update(params=int(summary["params"]), time_s=float(summary["search_time_s"]), artifact=adopted,
                       info={"adopted": adopted, "dms_settings": settings, "train_dtype": summary.get("dtype")})
            if summary.get("chosen_seed") is not None:
                row["info"]["chosen_seed"] = summary["chosen_seed"]
            return
        out = os.path.join(a.work, "dms", row["name"])
        values = dict(self.dms_recipe or {"dataset": a.calib_dataset, "seq_len": a.seq_len, "num_samples": a.calib_samples})
        values.update(model=a.model, target_ratio=row["budget"], target_params=None, output_dir=out, no_eval=True,
                      push_to_hub=None, seed=seed, stop_after=None, dtype=a.train_dtype, align=a.align)
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
            from ..cli.search import resumable

            resume = resumable(out)
            values.update(resume=resume, overwrite=not resume)
            seed_note = f", seed {seed}" if row["method"] == "dms" else ""
            print(f"[benchmark] {row['method']} at {row['budget']:g}{seed_note}: DMS search "
                  f"({'resuming' if resume else 'starting'}) in {out}", flush=True)
            run_command("search", values, out + ".search.yaml")
        summary = read_json(summary_path)
        row.update(params=int(summary["params"]), time_s=float(summary["search_time_s"]),
                   artifact=os.path.relpath(out, a.work), info={"dms_settings": {k: v for k, v in values.items() if k != "model"},
                                                                "train_dtype": summary.get("dtype")})
        if summary.get("chosen_seed") is not None:
            row["info"]["chosen_seed"] = summary["chosen_seed"]

    def checkpoint_of(self, base: dict) -> str:
        """A saved checkpoint folder of a row (fine-tuning and the GGUF export read a folder)."""
        work = self.args.work
        if base["method"] == "dense":
            from ..checkpoints.loading import resolve_model

            return resolve_model(self.args.model)
        if base["method"] in DMS_METHODS or base["recovery"]:
            folder = os.path.join(work, base["artifact"])
            if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
                kind = "recovered" if base["recovery"] else "search"
                raise RuntimeError(f"the {base['method']} {kind} folder {folder} holds no weights (copied without "
                                   f"them?); delete {self.row_path(base['name'])} to {'search' if kind == 'search' else 'fine-tune'} again")
            return folder
        folder = os.path.join(work, "models", base["name"])
        if not os.path.isfile(os.path.join(folder, "config.json")):
            from ..checkpoints import save_pruned

            model, plan = self.materialize(base, with_plan=True)
            save_pruned(model, self.tokenizer(), folder, plan, overwrite=True,
                        source_dir=self.args.model if os.path.isdir(self.args.model) else None)
        return folder

    def build_recovered(self, row: dict) -> None:
        a = self.args
        base = self.ensure_built(row["method"], row["budget"], 0, row.get("seed", a.seed))
        pruned_dir = self.checkpoint_of(base)
        out = os.path.join(a.work, "recovered", row["name"])
        summary_path = os.path.join(out, "finetune_summary.json")
        if not os.path.isfile(os.path.join(out, "config.json")) or not os.path.isfile(summary_path):
            from ..training.engine import has_checkpoint

            resume = has_checkpoint(os.path.join(out, "finetune_state"))
            print(f"[benchmark] {row['method']} at {row['budget']:g}: recovery fine-tuning, {a.recovery_steps} steps", flush=True)
            values = dict(self.recovery_recipe or dict(dataset=a.calib_dataset, seq_len=a.seq_len, num_samples=a.calib_samples))
            values.pop("epochs", None)  # --recovery-steps sets the length
            values.update(model=pruned_dir, teacher=a.model, output_dir=out, steps=a.recovery_steps, seed=a.seed,
                          dtype=a.train_dtype, no_eval=True, resume=resume, overwrite=not resume, push_to_hub=None)
            if a.data_dir:
                values["data_dir"] = a.data_dir
            run_command("finetune", values, out + ".finetune.yaml")
        summary = read_json(summary_path)
        row.update(params=int(summary["params"]), time_s=float(base["time_s"]) + float(summary["train_time_s"]),
                   artifact=os.path.relpath(out, a.work),
                   info={"recovery": {k: summary.get(k) for k in ("method", "steps", "teacher", "lr", "train_time_s", "dtype",
                                                                   "seed", "tokens")}})

    def ensure_built(self, method: str, budget: float, recovery: int, seed: int | None = None) -> dict:
        row = self.load_row(method, budget, recovery, seed)
        if row["params"] is None:
            self.build(row)
        elif self.describe(row):
            self.save_row(row)
        return row

    def materialize(self, row: dict, with_plan: bool = False):
        """The row's model in memory: the dense model, a baseline plan applied to it, or a saved checkpoint."""
        if row["method"] == "dense":
            return self.dense()
        path = os.path.join(self.args.work, row["artifact"])
        if row["method"] in BASELINES and not row["recovery"]:
            from ..plan import PrunePlan
            from ..prune import prune_model

            plan = PrunePlan.from_json(path)
            model = prune_model(self.dense(), plan)
            return (model, plan) if with_plan else model
        from ..checkpoints import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(path, dtype=self.args.dtype, device=self.args.device)
        return model

    # ----- evaluation ---------------------------------------------------------------------------
    def ppl_key(self, dataset: str, protocol: str, max_windows="main") -> str:
        return f"{dataset}|{protocol}|mw={self.args.max_windows if max_windows == 'main' else max_windows}"

    def task_key(self, task: str) -> str:
        return f"{task}|limit={self.args.limit}"

    def speed_key(self) -> str:
        a = self.args
        return f"reps={a.speed_reps}|prefill={a.speed_seq_len}|decode=32+{a.speed_new_tokens}"

    def llamacpp_key(self) -> str:
        a = self.args
        return f"{a.llamacpp_outtype}|threads={a.llamacpp_threads}|pp={a.llamacpp_pp}|tg={a.llamacpp_tg}|reps={a.llamacpp_reps}"

    def missing(self, row: dict) -> tuple[list, list, bool, bool]:
        """(perplexity cells, tasks, torch speed, llama.cpp speed) this row still lacks."""
        a = self.args
        ppl = [c for c in self.ppl_cells if c.applies(row["method"], row["budget"])
               and self.ppl_key(c.dataset, c.protocol, c.max_windows) not in row["ppl"]]
        tasks = [t for t in a.tasks if self.task_key(t) not in row["zero_shot"]]
        speed = a.speed_reps > 0 and row["method"] != "dense" and self.speed_key() not in row["speed"]
        llamacpp = bool(getattr(a, "llamacpp", False)) and row["method"] != "dense" and self.llamacpp_key() not in row.setdefault("llamacpp", {})
        return ppl, tasks, speed, llamacpp

    def evaluate(self, row: dict) -> None:
        ppl, tasks, speed, llamacpp = self.missing(row)
        if (speed or llamacpp) and row["recovery"]:
            # Fine-tuning keeps every shape, and speed depends on shapes only: reuse the pruned row's timings.
            base = self.load_row(row["method"], row["budget"], 0, row.get("seed"))
            for part, key, wanted in (("speed", self.speed_key(), speed), ("llamacpp", self.llamacpp_key() if llamacpp else None, llamacpp)):
                timing = (base.get(part) or {}).get(key) if wanted else None
                if timing:
                    row.setdefault(part, {})[key] = {**timing, "measured_on": base["name"]}
                    self.save_row(row)
            speed = speed and self.speed_key() not in row["speed"]
            llamacpp = llamacpp and self.llamacpp_key() not in row["llamacpp"]
        if not (ppl or tasks or speed or llamacpp):
            return
        a = self.args
        model = self.materialize(row) if (ppl or tasks or speed) else None
        if ppl or tasks:
            from ..evaluation import evaluate_model

            def record(max_windows):
                def on_part_done(results: dict) -> None:
                    times = results.get("time_s", {})
                    for label, by_protocol in results.get("ppl_details", {}).items():
                        for protocol, detail in by_protocol.items():
                            row["ppl"][self.ppl_key(detail["dataset"], protocol, max_windows)] = {
                                "label": label, "value": detail["ppl"], "n_windows": detail.get("n_windows"),
                                "time_s": times.get("ppl", {}).get(label, {}).get(protocol)}
                    for task, metrics in results.get("zero_shot", {}).items():
                        row["zero_shot"][self.task_key(task)] = {**metrics, "time_s": times.get("zero_shot", {}).get(task)}
                    if results.get("ppl_details"):
                        note_machine(row, "ppl")
                    if results.get("zero_shot"):
                        note_machine(row, "zero_shot")
                    self.save_row(row)

                return on_part_done

            # one evaluate_model call per (windows, protocol) of the missing cells, then the zero-shot tasks
            groups: dict = {}
            for cell in ppl:
                groups.setdefault((cell.max_windows, cell.protocol), []).append(cell.dataset)
            calls = [(datasets, [protocol], windows, []) for (windows, protocol), datasets in groups.items()]
            if tasks:
                calls.append(([], [], a.max_windows, tasks))
            print(f"[benchmark] evaluating {row['name']}: ppl {[c.dataset + '/' + c.column for c in ppl] or '-'} "
                  f"tasks {tasks or '-'}", flush=True)
            for datasets, protocols, windows, task_list in calls:
                evaluate_model(model, self.tokenizer(), ppl=datasets, protocols=protocols, tasks=task_list,
                               data_dir=a.data_dir, limit=a.limit, batch_size=a.batch_size, max_windows=windows,
                               seed=a.seed, model_name=row["name"], progress=False, on_part_done=record(windows))
        if speed:
            from ..evaluation.speed import relative_speed

            print(f"[benchmark] timing {row['name']} against dense", flush=True)
            res = relative_speed({"dense": self.dense(), "pruned": model}, reference="dense", reps=a.speed_reps,
                                 seq_len=a.speed_seq_len, new_tokens=a.speed_new_tokens)
            row["speed"][self.speed_key()] = {**res["models"]["pruned"], "dense": res["models"]["dense"], "settings": res["settings"]}
            note_machine(row, "speed")
            self.save_row(row)
        if llamacpp:
            self.time_llamacpp(row)

    def time_llamacpp(self, row: dict) -> None:
        """The row's checkpoint and the dense one as GGUF files (--llamacpp-outtype) in llama.cpp: prompt
        processing and generation tokens/s, the two models interleaved (dms_llm.export.llamacpp)."""
        from ..export import llamacpp

        a = self.args
        work = os.path.join(a.work, "gguf")
        print(f"[benchmark] llama.cpp: timing {row['name']} against dense ({a.llamacpp_outtype}, "
              f"{a.llamacpp_threads} thread(s))", flush=True)
        files = {"dense": llamacpp.gguf_file(work, "dense", self.checkpoint_of({"method": "dense"}), a.llamacpp_outtype),
                 "pruned": llamacpp.gguf_file(work, row["name"], self.checkpoint_of(row), a.llamacpp_outtype)}
        res = llamacpp.interleaved_speed(files, threads=a.llamacpp_threads, reps=a.llamacpp_reps, pp=a.llamacpp_pp,
                                         tg=a.llamacpp_tg)
        pruned, dense = res["pruned"], res["dense"]
        row["llamacpp"][self.llamacpp_key()] = {
            "pp": pruned["pp"], "tg": pruned["tg"], "dense_pp": dense["pp"], "dense_tg": dense["tg"],
            "pp_speedup": pruned["pp"] / dense["pp"], "tg_speedup": pruned["tg"] / dense["tg"], "clock": res["clock"],
            "load_average_max": res["load_average_max"], "gguf": os.path.relpath(files["pruned"], a.work),
            "samples": {"pruned": pruned["samples"], "dense": dense["samples"]}}
        note_machine(row, "llamacpp")
        self.save_row(row)

    # ----- the report ---------------------------------------------------------------------------
    def report_row(self, row: dict) -> dict:
        a = self.args
        ppl: dict = {}
        eval_time: dict = {}
        for cell in self.ppl_cells:
            if not cell.applies(row["method"], row["budget"]):
                continue
            hit = row["ppl"].get(self.ppl_key(cell.dataset, cell.protocol, cell.max_windows))
            if hit:
                ppl.setdefault(hit["label"], {})[cell.column] = hit["value"]
                if hit.get("time_s") is not None:
                    eval_time[f"ppl/{hit['label']}/{cell.column}"] = hit["time_s"]
        zs = {}
        for t in a.tasks:
            m = row["zero_shot"].get(self.task_key(t))
            if m:
                zs[t] = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith("n") and k != "time_s"}
                zs[t]["stderr"] = m.get(f"{m.get('reported_metric')}_stderr")
                if m.get("time_s") is not None:
                    eval_time[f"zero_shot/{t}"] = m["time_s"]
        avg, avg_se = zero_shot_average([zs.get(t) for t in a.tasks])
        sp = row["speed"].get(self.speed_key()) or {}
        dense_speed = 1.0 if row["method"] == "dense" else None
        out = {"method": row["method"], "budget": row["budget"], "recovery": row["recovery"], "seed": row.get("seed"),
               "params": row["params"], "ppl": ppl, "zero_shot": zs, "zero_shot_avg": avg, "zero_shot_avg_stderr": avg_se,
               "prefill_speedup": sp.get("prefill_speedup", dense_speed), "decode_speedup": sp.get("decode_speedup", dense_speed),
               "time_s": row["time_s"], "eval_time_s": eval_time, "machines": row.get("machines", {}),
               "dtype": row.get("dtype", a.dtype), "train_dtype": row.get("train_dtype"),
               "calib_tokens": row.get("calib_tokens"), "recovery_tokens": row.get("recovery_tokens")}
        if getattr(a, "llamacpp", False):
            lc = (row.get("llamacpp") or {}).get(self.llamacpp_key()) or {}
            one = 1.0 if row["method"] == "dense" else None
            out.update(llamacpp_pp_speedup=lc.get("pp_speedup", one), llamacpp_tg_speedup=lc.get("tg_speedup", one),
                       llamacpp_pp=lc.get("pp"), llamacpp_tg=lc.get("tg"))
        if (row.get("info") or {}).get("chosen_seed") is not None:
            out["chosen_seed"] = row["info"]["chosen_seed"]
        return out


def zero_shot_average(tasks: list) -> tuple[float | None, float | None]:
    """The mean of the tasks' reported accuracies and its standard error sqrt(sum SE_i^2) / n, the tasks
    taken as independent (each SE_i is lm-eval's standard error of that task's mean accuracy). None
    unless every task has a value (and, for the SE, a standard error)."""
    if not tasks or any(t is None or t.get("value") is None for t in tasks):
        return None, None
    avg = sum(t["value"] for t in tasks) / len(tasks)
    ses = [t.get("stderr") for t in tasks]
    se = None if any(x is None for x in ses) else sum(x * x for x in ses) ** 0.5 / len(tasks)
    return avg, se
