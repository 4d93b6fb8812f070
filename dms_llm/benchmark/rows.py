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

from ..files import read_json, write_json_atomic, write_text_atomic
from .report import note_machine

BASELINES = ("magnitude", "wanda-sp", "llm-pruner", "flap", "shortgpt")
DMS_METHODS = ("dms", "dms-restarts", "dms-lora")
ALL_METHODS = ("dense",) + BASELINES + DMS_METHODS
# dms-restarts costs --dms-restarts searches per budget, so it runs only when asked for.
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m != "dms-restarts")
ROW_FORMAT = "dms_benchmark_row/1"




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
    def identity(self, method: str, budget: float, recovery: int) -> dict:
        a = self.args
        ident = {"model": a.model, "dtype": a.dtype, "method": method, "budget": budget}
        if method in BASELINES:
            from ..baselines import VERSIONS

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
        if a.align != 1 and method != "dense":  # left out at 1: rows made before alignment stay valid
            ident.update(align=a.align)
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
        self.save_row(row)

    def build_dms(self, row: dict) -> None:
        a = self.args
        adopted = a.adopted.get((row["method"], row["budget"]))
        if adopted:
            summary = read_json(os.path.join(adopted, "search_summary.json"))
            target = self.target(row["budget"])
            if int(summary["target_params"]) != target or int(summary["params"]) > target:
                raise RuntimeError(f"--adopt {adopted}: its target is {summary['target_params']:,} parameters, the "
                                   f"budget {row['budget']:g} here means {target:,}; adopt a run made for this budget")
            settings_path = os.path.join(adopted, "search_config.json")
            settings = read_json(settings_path) if os.path.isfile(settings_path) else None
            row.update(params=int(summary["params"]), time_s=float(summary["search_time_s"]), artifact=adopted,
                       info={"adopted": adopted, "dms_settings": settings})
            return
        out = os.path.join(a.work, "dms", row["name"])
        values = dict(self.dms_recipe or {"dataset": a.calib_dataset, "seq_len": a.seq_len, "num_samples": a.calib_samples})
        values.update(model=a.model, target_ratio=row["budget"], target_params=None, output_dir=out, no_eval=True,
                      push_to_hub=None, seed=a.seed, stop_after=None, dtype=a.train_dtype, align=a.align)
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
            print(f"[benchmark] {row['method']} at {row['budget']:g}: DMS search ({'resuming' if resume else 'starting'}) in {out}", flush=True)
            run_command("search", values, out + ".search.yaml")
        summary = read_json(summary_path)
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
            from ..checkpoints import save_pruned

            model, plan = self.materialize(base, with_plan=True)
            save_pruned(model, self.tokenizer(), folder, plan, overwrite=True,
                        source_dir=self.args.model if os.path.isdir(self.args.model) else None)
        return folder

    def build_recovered(self, row: dict) -> None:
        a = self.args
        base = self.ensure_built(row["method"], row["budget"], 0)
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
                   info={"recovery": {k: summary.get(k) for k in ("method", "steps", "teacher", "lr", "train_time_s", "dtype")}})

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
            from ..plan import PrunePlan
            from ..prune import prune_model

            plan = PrunePlan.from_json(path)
            model = prune_model(self.dense(), plan)
            return (model, plan) if with_plan else model
        from ..checkpoints import load_model_and_tokenizer

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
            from ..evaluation import evaluate_model

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
            from ..evaluation.speed import relative_speed

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
