"""The benchmark's rows: one cached JSON per (method, budget, recovery), built once and evaluated as far
as asked. The one-shot baselines are plans applied to the dense model; the DMS rows and the recovery
fine-tuning run what `dms-llm search` / `dms-llm finetune` run (`dms_llm.runs`, on a recipe written beside
the folder), so their folders are exactly what those commands write and `--adopt` takes a folder made
either way.
The `BASELINE+compensation` rows are built in `compensated.py`."""

from __future__ import annotations

import hashlib
import json
import os
import time

from ..errors import ActionableError
from ..files import read_json, write_json_atomic
from ..runs import run_command
from ..runs.options import ConfigError
from ..runs.search import same_search
from .cells import ppl_cells
from .compensated import COMPENSATED, COMPENSATION, build_compensated, compensation_calibration, refit_settings
from .measure import RowMeasurements
from .report import note_machine
from .row import CurvePoint, Row

BASELINES = ("magnitude", "wanda-sp", "llm-pruner", "flap", "shortgpt")
DMS_METHODS = ("dms", "dms-restarts", "dms-lora")
ALL_METHODS = ("dense",) + BASELINES + COMPENSATED + DMS_METHODS
# dms-restarts costs --dms-restarts searches per budget, so it runs only when asked for; the compensated
# baselines read the DMS recipe's calibration and refit settings, so a config names them.
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m != "dms-restarts" and m not in COMPENSATED)
ROW_FORMAT = "dms_benchmark_row/1"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Benchmark(RowMeasurements):
    def __init__(self, args):
        self.args = args
        self._dense = None
        self._tok = None
        self._blocks = None
        self.dms_recipe = None
        self.recovery_recipe = None
        from ..runs.search import load_recipe

        if args.dms_config:
            self.dms_recipe = load_recipe(args.dms_config)
        self._budget_recipes = {b: load_recipe(path) for b, path in (getattr(args, "dms_budget_config", None) or {}).items()}
        if args.recovery_config:
            from ..runs.finetune import load_recipe

            self.recovery_recipe = load_recipe(args.recovery_config)
            if self.recovery_recipe.get("max_tokens") is not None:  # rows are named and cached by their steps
                raise ConfigError(f"--recovery-config {args.recovery_config} sets max-tokens, but --recovery-steps sets "
                                  "the length of the recovery rows: remove max-tokens from the recipe")
        self.curve_recipe = self.recovery_recipe
        if getattr(args, "recovery_curve_config", None):
            from ..runs.finetune import load_recipe

            self.curve_recipe = load_recipe(args.recovery_curve_config)
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
    def seeds(self, method: str, budget: float | None = None, recovery=0) -> list[int]:
        """The rows a method has per budget: one per --dms-seeds seed for `dms`, else one (--seed). A `dms`
        recovery-curve point has one row, of the median seed (`curve_seeds`)."""
        a = self.args
        if method != "dms":
            return [a.seed]
        seeds = list(getattr(a, "dms_seeds", None) or [a.seed])
        return self.curve_seeds(budget, seeds) if isinstance(recovery, CurvePoint) else seeds

    def curve_seeds(self, budget: float, seeds: list[int]) -> list[int]:
        """[the seed whose one-shot row has the median of the first perplexity cell] (the lower middle one of an
        even count), once every seed's one-shot row has it; until then every seed (so that planning before the
        one-shot rows are measured, as --from-results does, misses none)."""
        cell = next((c for c in self.ppl_cells if c.budgets is None), None)
        key = cell and self.ppl_key(cell.dataset, cell.protocol, cell.max_windows)
        values = [((self.load_row("dms", budget, 0, s)["ppl"].get(key) or {}).get("value"), s) for s in seeds]
        if key is None or any(v is None for v, _ in values):
            return seeds
        return [sorted(values)[(len(values) - 1) // 2][1]]

    @staticmethod
    def recovery_of(row: Row):
        """The recovery a row was built with: its CurvePoint, its steps, or 0 (one-shot)."""
        if row.get("curve_tokens") is not None:
            return CurvePoint(int(row["curve_tokens"]))
        return (row.get("identity") or {}).get("recovery_steps", 0)

    def dms_steps(self, budget: float) -> int | None:
        """--dms-steps for this budget: the DMS searches' steps in place of the recipe's, or None."""
        return (getattr(self.args, "dms_steps", None) or {}).get(float(budget))

    def recipe(self, budget: float) -> dict | None:
        """The DMS recipe of a budget's rows: its --dms-budget-config, else --dms-config."""
        return self._budget_recipes.get(float(budget), self.dms_recipe)

    def adopted_folder(self, method: str, budget: float, seed: int | None = None) -> str | None:
        a = self.args
        seed = a.seed if seed is None else seed
        return a.adopted.get((method, budget, seed)) or (a.adopted.get((method, budget)) if seed == a.seed else None)

    def identity(self, method: str, budget: float, recovery: int, seed: int | None = None, as_recipe: bool = False) -> dict:
        """What a row's results depend on (its cache name is a digest of it). An adopted search is named by its
        folder; `as_recipe` gives the identity the row has when the benchmark runs the search itself."""
        a = self.args
        seed = a.seed if seed is None else seed
        ident = {"model": a.model, "dtype": a.dtype, "method": method, "budget": budget}
        if method in BASELINES:
            from ..baselines import VERSIONS

            ident.update(calib=[a.calib_dataset, a.calib_samples, a.seq_len, a.seed])
            if VERSIONS[method] > 1:  # version 1 is left out so that the first cached rows stay valid
                ident.update(version=VERSIONS[method])
        if method in COMPENSATED:
            from ..baselines import VERSIONS

            base = method[: -len(COMPENSATION)]
            ident.update(calib=compensation_calibration(self, base, budget), refit=refit_settings(self.recipe(budget)),
                         version=VERSIONS[base])
        adopted = None if as_recipe else self.adopted_folder(method, budget, seed)
        if adopted:
            with open(os.path.join(adopted, "search_summary.json")) as f:
                ident.update(adopted=adopted, summary=_digest(json.load(f)))
        elif method in DMS_METHODS:
            ident.update(recipe=self.recipe(budget), seed=seed)  # a dms row per --dms-seeds seed; the others --seed
            steps = self.dms_steps(budget)
            if steps is not None:  # absent otherwise, so rows without --dms-steps keep their names
                ident.update(steps=steps)
            if method == "dms-restarts":
                ident.update(restarts=a.dms_restarts)
            if self.recipe(budget) is None:  # the search then calibrates like the baselines
                ident.update(calib=[a.calib_dataset, a.calib_samples, a.seq_len])
        if a.align != 1 and method != "dense":  # left out at 1: the key of an exact-width row has no align
            ident.update(align=a.align)
        if a.train_dtype != "auto" and (method in DMS_METHODS or recovery):  # left out at auto: earlier rows stay valid
            ident.update(train_dtype=a.train_dtype)
        if isinstance(recovery, CurvePoint):
            ident.update(recovery_tokens=recovery.tokens, recovery_recipe=self.curve_recipe, recovery_seed=a.seed)
        elif recovery:
            ident.update(recovery_steps=recovery, recovery_data=[a.calib_dataset, a.calib_samples, a.seq_len, a.seed])
            if self.recovery_recipe is not None:
                ident.update(recovery_recipe=self.recovery_recipe)
        return ident

    def row_name(self, method: str, budget: float, recovery: int, seed: int | None = None, as_recipe: bool = False) -> str:
        seed = self.args.seed if seed is None else seed
        # A dms row of another seed than 0 says so; the seed-0 row's key has no seed, so cached rows stay valid.
        tag = "dms" + (f"-seed{seed}" if seed != 0 else "") if method == "dms" else method
        tag = "dense" if method == "dense" else f"{tag}-b{budget:g}" + (f"-rec{recovery}" if recovery else "")
        return f"{tag}-{_digest(self.identity(method, budget, recovery, seed, as_recipe))}"

    def recipe_name(self, method: str, budget: float, recovery: int, seed: int) -> str | None:
        """For a row whose search was adopted: the name the row has without `--adopt`, when the adopted folder's
        search settings are the ones the benchmark would have run (so that `--from-results` on another machine,
        without the folder, restores the row instead of searching again); else None."""
        folder = self.adopted_folder(method, budget, seed)
        path = os.path.join(folder, "search_config.json") if folder else None
        if path is None or not os.path.isfile(path):
            return None
        expected = self.dms_search_values(method, budget, seed, out=folder)
        if not same_search(read_json(path), expected):
            return None
        return self.row_name(method, budget, recovery, seed, as_recipe=True)

    def row_path(self, name: str) -> str:
        return os.path.join(self.args.work, "rows", name + ".json")

    def load_row(self, method: str, budget: float, recovery: int, seed: int | None = None) -> Row:
        seed = self.args.seed if seed is None else seed
        name = self.row_name(method, budget, recovery, seed)
        path = self.row_path(name)
        if os.path.isfile(path):
            with open(path) as f:
                row = json.load(f)
            row.setdefault("seed", seed)  # a cached row without a seed was made with this one
            row.setdefault("llamacpp", {})
            return row
        row = {"format": ROW_FORMAT, "name": name, "identity": self.identity(method, budget, recovery, seed), "method": method,
               "budget": budget, "recovery": bool(recovery), "seed": seed, "params": None, "time_s": None, "artifact": None,
               "ppl": {}, "zero_shot": {}, "speed": {}, "llamacpp": {}}
        if isinstance(recovery, CurvePoint):
            row["curve_tokens"] = recovery.tokens
        return row

    def save_row(self, row: Row) -> None:
        write_json_atomic(self.row_path(row["name"]), row)

    # ----- building pruned models ---------------------------------------------------------------
    def target(self, budget: float) -> int:
        from ..budget import ParameterCounter

        return int(budget * ParameterCounter(self.dense()).dense())

    def build(self, row: Row) -> None:
        method, budget = row["method"], row["budget"]
        work = self.args.work
        if method == "dense":
            from ..budget import count_parameters

            row.update(params=count_parameters(self.dense()), time_s=0.0, artifact=None)
        elif row["recovery"]:
            self.build_recovered(row)
        elif method in COMPENSATED:
            build_compensated(self, row)
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
            plan.metadata.time_s = seconds
            plan.to_json(path)
            row.update(params=plan.params_after, time_s=seconds, artifact=os.path.relpath(path, work),
                       info={k: v for k, v in plan.metadata.to_dict().items() if k not in ("block_influence",)})
        else:
            self.build_dms(row)
        if method != "dense" and not (row.get("info") or {}).get("adopted"):
            note_machine(row, "build")  # where the plan, search or fine-tuning ran
        self.describe(row)
        self.save_row(row)

    def describe(self, row: Row) -> bool:
        """Fills what every row records beside its results: `seed`, `dtype` (evaluation), `train_dtype`
        (search or fine-tuning), `calib_tokens` (the calibration text of the pruning: blocks x tokens) and,
        for a recovered row, `recovery_tokens`; a cached row without them gets them here. True when
        something was added."""
        a = self.args
        before = {k: row.get(k) for k in ("seed", "dtype", "train_dtype", "calib_tokens", "recovery_tokens")}
        ident, info = row.get("identity") or {}, row.get("info") or {}
        row.setdefault("dtype", ident.get("dtype", a.dtype))
        if row["method"] == "dense":
            row.setdefault("calib_tokens", 0)
        elif (row["method"] in BASELINES or row["method"] in COMPENSATED) and not row["recovery"]:
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

    def dms_search_values(self, method: str, budget: float, seed: int, out: str) -> dict:
        """The `dms-llm search` recipe that builds the DMS row (method, budget, seed) into the folder `out`."""
        a = self.args
        values = dict(self.recipe(budget) or {"dataset": a.calib_dataset, "seq_len": a.seq_len, "num_samples": a.calib_samples})
        values.update(model=a.model, target_ratio=budget, target_params=None, output_dir=out, no_eval=True,
                      push_to_hub=None, seed=seed, stop_after=None, dtype=a.train_dtype, align=a.align)
        steps = self.dms_steps(budget)
        if steps is not None:
            values["steps"] = steps
        if a.data_dir:
            values["data_dir"] = a.data_dir
        if method == "dms-lora":
            values.update(train_weights="lora", distill=True)
        else:
            values["train_weights"] = "none"
        if method == "dms-restarts":
            values["restarts"] = a.dms_restarts
        return values

    def build_dms(self, row: Row) -> None:
        a = self.args
        seed = row.get("seed", a.seed)
        adopted = self.adopted_folder(row["method"], row["budget"], seed)
        if adopted:
            summary = read_json(os.path.join(adopted, "search_summary.json"))
            target = self.target(row["budget"])
            if int(summary["target_params"]) != target or int(summary["params"]) > target:
                raise ActionableError(f"--adopt {adopted}: its target is {summary['target_params']:,} parameters, the "
                                   f"budget {row['budget']:g} here means {target:,}; adopt a run made for this budget")
            settings_path = os.path.join(adopted, "search_config.json")
            settings = read_json(settings_path) if os.path.isfile(settings_path) else None
            row.update(params=int(summary["params"]), time_s=float(summary["search_time_s"]), artifact=adopted,
                       info={"adopted": adopted, "dms_settings": settings, "train_dtype": summary.get("dtype")})
            if summary.get("chosen_seed") is not None:
                row["info"]["chosen_seed"] = summary["chosen_seed"]
            return
        out = os.path.join(a.work, "dms", row["name"])
        values = self.dms_search_values(row["method"], row["budget"], seed, out)
        summary_path = os.path.join(out, "search_summary.json")
        if not os.path.isfile(summary_path):
            from ..runs.search import resumable

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

    def rebuild(self, row: Row) -> None:
        """A row restored from a results file (`--from-results`) has measurements but no model: builds it again
        and measures one of its restored perplexity cells (the one with the fewest windows) to check that it is
        the published model. The row keeps the published build time and machine, and records the rebuild's; on
        a disagreement it is left as it was restored and the run stops."""
        import copy

        from ..evaluation import evaluate_model
        from .restore import REBUILD_RTOL

        restored = copy.deepcopy(row)
        cells = [c for c in self.ppl_cells if self.ppl_key(c.dataset, c.protocol, c.max_windows) in row["ppl"]]
        if not cells:
            raise ActionableError(f"{row['name']} was restored from {row.get('restored_from')} without a perplexity cell "
                               f"to check a rebuilt model against; delete {self.row_path(row['name'])} to measure it anew")
        cell = min(cells, key=lambda c: c.max_windows or float("inf"))
        published = row["ppl"][self.ppl_key(cell.dataset, cell.protocol, cell.max_windows)]["value"]
        print(f"[benchmark] {row['name']}: rebuilding the restored row's model, then checking its {cell.dataset} "
              f"({cell.column}) perplexity against the results file", flush=True)
        self.build(row)
        results = evaluate_model(self.load_model(row), self.tokenizer(), ppl=[cell.dataset], protocols=[cell.protocol],
                                 data_dir=self.args.data_dir, batch_size=self.args.batch_size, max_windows=cell.max_windows,
                                 seed=self.args.seed, model_name=row["name"], progress=False)
        (measured,) = [detail["ppl"] for by_protocol in results["ppl_details"].values() for detail in by_protocol.values()]
        if row["params"] != restored["params"] or abs(measured - published) > REBUILD_RTOL * published:
            self.save_row(restored)
            raise ActionableError(
                f"{row['name']}: the rebuilt model is not the one in {restored.get('restored_from')} ({row['params']:,} "
                f"parameters, {cell.dataset} {measured:.4f}; the file: {restored['params']:,}, {published:.4f}), so "
                f"new cells cannot join its measurements (another library version, recipe or machine took another "
                f"path); delete {self.row_path(row['name'])} to measure the whole row here")
        row["rebuilt"] = {"time_s": row["time_s"], "machine": (row.get("machines") or {}).get("build"),
                          "check": {"cell": cell.describe(), "published": published, "measured": measured}}
        row["time_s"] = restored["time_s"]
        row["machines"] = restored["machines"]
        self.save_row(row)

    def ensure_model(self, row: Row) -> None:
        # a restored row whose rebuild was not checked yet (none, or interrupted before the check) is rebuilt
        if row["method"] != "dense" and (row.get("artifact") is None or (row.get("restored_from") and "rebuilt" not in row)):
            self.rebuild(row)

    def checkpoint_of(self, base: Row) -> str:
        """A saved checkpoint folder of a row (fine-tuning and the GGUF export read a folder)."""
        work = self.args.work
        if base["method"] == "dense":
            from ..checkpoints.loading import resolve_model

            return resolve_model(self.args.model)
        self.ensure_model(base)
        if base["method"] in DMS_METHODS or base["method"] in COMPENSATED or base["recovery"]:
            folder = os.path.join(work, base["artifact"])
            if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
                kind = "recovered" if base["recovery"] else "search"
                raise ActionableError(f"the {base['method']} {kind} folder {folder} holds no weights (copied without "
                                   f"them?); delete {self.row_path(base['name'])} to {'search' if kind == 'search' else 'fine-tune'} again")
            return folder
        folder = os.path.join(work, "models", base["name"])
        if not os.path.isfile(os.path.join(folder, "config.json")):
            from ..checkpoints import save_pruned

            model, plan = self.materialize(base, with_plan=True)
            save_pruned(model, self.tokenizer(), folder, plan, overwrite=True,
                        source_dir=self.args.model if os.path.isdir(self.args.model) else None)
        return folder

    def build_recovered(self, row: Row) -> None:
        a = self.args
        base = self.ensure_built(row["method"], row["budget"], 0, row.get("seed", a.seed))
        pruned_dir = self.checkpoint_of(base)
        out = os.path.join(a.work, "recovered", row["name"])
        summary_path = os.path.join(out, "finetune_summary.json")
        if not os.path.isfile(os.path.join(out, "config.json")) or not os.path.isfile(summary_path):
            from ..training.engine import has_checkpoint

            resume = has_checkpoint(os.path.join(out, "finetune_state"))
            curve = row.get("curve_tokens")
            recipe = self.curve_recipe if curve is not None else self.recovery_recipe
            length = dict(max_tokens=curve, steps=None) if curve is not None else dict(steps=row["identity"]["recovery_steps"])
            print(f"[benchmark] {row['method']} at {row['budget']:g}: recovery fine-tuning, "
                  + (f"{curve:,} tokens" if curve is not None else f"{length['steps']} steps"), flush=True)
            values = dict(recipe or dict(dataset=a.calib_dataset, seq_len=a.seq_len, num_samples=a.calib_samples))
            values.pop("epochs", None)  # --recovery-steps or the curve's point sets the length
            values.update(model=pruned_dir, teacher=a.model, output_dir=out, seed=a.seed, dtype=a.train_dtype, no_eval=True,
                          resume=resume, overwrite=not resume, push_to_hub=None, **length)
            if curve is not None:  # each point keeps its final state; the next one continues the longest finished one
                values.update(keep_state=True, continue_from=self.curve_start(row, values.get("schedule", "constant")))
            if a.data_dir:
                values["data_dir"] = a.data_dir
            run_command("finetune", values, out + ".finetune.yaml")
        summary = read_json(summary_path)
        row.update(params=int(summary["params"]), time_s=float(base["time_s"]) + float(summary["train_time_s"]),
                   artifact=os.path.relpath(out, a.work),
                   info={"recovery": {k: summary.get(k) for k in ("method", "steps", "teacher", "lr", "train_time_s", "dtype",
                                                                   "seed", "tokens", "continued_at_step")}})

    def curve_start(self, row: Row, schedule: str) -> str | None:
        """The run a recovery-curve row continues (--continue-from): the longest shorter point of its method, budget
        and seed that finished with its state kept. Under a constant rate the data order and the rate are functions
        of the step, so N tokens are the first N of a longer run: the curve costs its longest point. None under a
        cosine schedule (its rate depends on the length) or when no shorter point has finished."""
        from ..training.engine import has_checkpoint

        if schedule != "constant":
            return None
        shorter = [p.tokens for m, b, p in getattr(self.args, "curve", [])
                   if (m, b) == (row["method"], row["budget"]) and p.tokens < row["curve_tokens"]]
        for tokens in sorted(shorter, reverse=True):
            name = self.row_name(row["method"], row["budget"], CurvePoint(tokens), row["seed"])
            folder = os.path.join(self.args.work, "recovered", name)
            if os.path.isfile(os.path.join(folder, "finetune_summary.json")) and has_checkpoint(os.path.join(folder, "finetune_state")):
                return folder
        return None

    def ensure_built(self, method: str, budget: float, recovery: int, seed: int | None = None) -> Row:
        row = self.load_row(method, budget, recovery, seed)
        if row["params"] is None:
            self.build(row)
        elif self.describe(row):
            self.save_row(row)
        return row

    def materialize(self, row: Row, with_plan: bool = False):
        """The row's model in memory: the dense model, a baseline plan applied to it, or a saved checkpoint."""
        self.ensure_model(row)
        return self.load_model(row, with_plan)

    def load_model(self, row: Row, with_plan: bool = False):
        """`materialize` without the rebuild of a restored row (the rebuild's own check loads it this way)."""
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
