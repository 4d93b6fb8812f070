"""Measuring the benchmark's rows: perplexity cells, zero-shot tasks, torch and llama.cpp speed against
dense, each result stored in the row keyed by its settings (so a rerun measures only what is missing), and
the row as the report shows it."""

from __future__ import annotations

import os

from .cells import zero_shot_average
from .report import note_machine
from .row import ReportedRow, Row


class RowMeasurements:
    """The evaluation half of `rows.Benchmark` (a mixin: it uses the row cache and models of that class)."""

    def ppl_key(self, dataset: str, protocol: str, max_windows="main") -> str:
        return f"{dataset}|{protocol}|mw={self.args.max_windows if max_windows == 'main' else max_windows}"

    # The cache keys of a row's results, from this run's settings or (`settings`) those of a results file.
    def task_key(self, task: str, settings=None) -> str:
        return f"{task}|limit={(settings or self.args).limit}"

    def speed_key(self, settings=None) -> str:
        a = settings or self.args
        return f"reps={a.speed_reps}|prefill={a.speed_seq_len}|decode=32+{a.speed_new_tokens}"

    def llamacpp_key(self, settings=None) -> str:
        a = settings or self.args
        return f"{a.llamacpp_outtype}|threads={a.llamacpp_threads}|pp={a.llamacpp_pp}|tg={a.llamacpp_tg}|reps={a.llamacpp_reps}"

    def missing(self, row: Row) -> tuple[list, list, bool, bool]:
        """(perplexity cells, tasks, torch speed, llama.cpp speed) this row still lacks. A recovery-curve row
        measures only the perplexity cells that every budget has (not those of --ppl-extra limited to some budgets),
        and no tasks."""
        a = self.args
        curve = row.get("curve_tokens") is not None
        ppl = [c for c in self.ppl_cells if c.applies(row["method"], row["budget"]) and not (curve and c.budgets is not None)
               and self.ppl_key(c.dataset, c.protocol, c.max_windows) not in row["ppl"]]
        tasks = [] if curve else [t for t in a.tasks if self.task_key(t) not in row["zero_shot"]]
        speed = a.speed_reps > 0 and row["method"] != "dense" and self.speed_key() not in row["speed"]
        llamacpp = bool(getattr(a, "llamacpp", False)) and row["method"] != "dense" and self.llamacpp_key() not in row.setdefault("llamacpp", {})
        return ppl, tasks, speed, llamacpp

    def evaluate(self, row: Row) -> None:
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
                            column = next(c.column for c in self.ppl_cells
                                          if (c.dataset, c.protocol, c.max_windows) == (detail["dataset"], protocol, max_windows))
                            note_machine(row, "ppl", cell=f"{label}/{column}")
                    for task, metrics in results.get("zero_shot", {}).items():
                        row["zero_shot"][self.task_key(task)] = {**metrics, "time_s": times.get("zero_shot", {}).get(task)}
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

    def time_llamacpp(self, row: Row) -> None:
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
    def report_row(self, row: Row) -> ReportedRow:
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
        out = {"name": row["name"], "method": row["method"], "budget": row["budget"], "recovery": row["recovery"], "seed": row.get("seed"),
               "params": row["params"], "ppl": ppl, "zero_shot": zs, "zero_shot_avg": avg, "zero_shot_avg_stderr": avg_se,
               "prefill_speedup": sp.get("prefill_speedup", dense_speed), "decode_speedup": sp.get("decode_speedup", dense_speed),
               "time_s": row["time_s"], "eval_time_s": eval_time, "machines": row.get("machines", {}),
               "dtype": row.get("dtype", a.dtype), "train_dtype": row.get("train_dtype"),
               "calib_tokens": row.get("calib_tokens"), "recovery_tokens": row.get("recovery_tokens")}
        if row.get("curve_tokens") is not None:
            out["curve_tokens"] = row["curve_tokens"]
        if getattr(a, "llamacpp", False):
            lc = (row.get("llamacpp") or {}).get(self.llamacpp_key()) or {}
            one = 1.0 if row["method"] == "dense" else None
            out.update(llamacpp_pp_speedup=lc.get("pp_speedup", one), llamacpp_tg_speedup=lc.get("tg_speedup", one),
                       llamacpp_pp=lc.get("pp"), llamacpp_tg=lc.get("tg"))
        if (row.get("info") or {}).get("chosen_seed") is not None:
            out["chosen_seed"] = row["info"]["chosen_seed"]
        if row["method"] != "dense":
            recipe_name = self.recipe_name(row["method"], row["budget"], self.recovery_of(row), row.get("seed", a.seed))
            if recipe_name:
                out["recipe_name"] = recipe_name
        return out
