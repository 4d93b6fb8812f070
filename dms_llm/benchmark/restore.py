"""Filling an empty benchmark cache from a results file (`--from-results eval/results/<model>.json`), so that a
published table can be extended on another machine without measuring its rows again.

A restored row holds the file's measurements and no model. A model is built again only when a missing cell
needs it (`Benchmark.rebuild`), and then checked to be the published one: one of its restored perplexity cells
is measured again and must agree with the file, else the row is left as it was and the run stops."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from .row import ReportedRow, Row

# Relative agreement a rebuilt model's perplexity must reach with the file's. Baseline plans rebuilt on another
# CPU (Intel Xeon, the file's rows from an AMD EPYC) reproduced their 128-token perplexity to 4e-8; a DMS search
# with the same seed there took another path (its rounding differs) and ended 13% higher.
REBUILD_RTOL = 1e-4


def read_results(path: str) -> dict:
    """The results file, checked for what restoring needs: rows that carry their cache name, and the
    perplexity cells it measured."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--from-results {path}: not a readable JSON file ({e})") from None
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not isinstance(results.get("settings"), dict):
        raise ValueError(f"--from-results {path}: not a benchmark results file (no rows and settings)")
    if any("name" not in r for r in rows) or "ppl_cell_specs" not in results["settings"]:
        raise ValueError(f"--from-results {path}: its rows carry no cache names or its settings no perplexity cells "
                         "(a file written before restoring existed); regenerate it with --report-only from the cache "
                         "that made it")
    return results


def _row_from_report(bench, row: Row, published: ReportedRow, settings: dict) -> None:
    """The inverse of `RowMeasurements.report_row`: every measurement of the published row under the cache key
    of the settings the file measured it with (which need not be this run's: `--tasks none` here does not
    drop the file's zero-shot results)."""
    from .cells import PPLCell

    measured_with = SimpleNamespace(**{k: settings.get(k) for k in ("limit", "speed_reps", "speed_seq_len", "speed_new_tokens")},
                                    **{f"llamacpp_{k}": v for k, v in (settings.get("llamacpp") or {}).items()})
    times = published.get("eval_time_s") or {}
    for spec in settings["ppl_cell_specs"]:
        cell = PPLCell(**{**spec, "budgets": tuple(spec["budgets"]) if spec["budgets"] is not None else None})
        value = (published["ppl"].get(cell.dataset) or {}).get(cell.column)
        if value is not None and cell.applies(published["method"], published["budget"]):
            row["ppl"][bench.ppl_key(cell.dataset, cell.protocol, cell.max_windows)] = {
                "label": cell.dataset, "value": value, "time_s": times.get(f"ppl/{cell.dataset}/{cell.column}")}
    for task, metrics in published["zero_shot"].items():
        # the reported metric is the one whose value and standard error the report copied (none: no stderr)
        reported = next((k for k in metrics if k not in ("value", "stderr") and metrics[k] == metrics["value"]
                         and metrics.get(f"{k}_stderr") == metrics["stderr"]), None)
        row["zero_shot"][bench.task_key(task, measured_with)] = {**{k: v for k, v in metrics.items() if k != "stderr"},
                                                                 "reported_metric": reported,
                                                                 "time_s": times.get(f"zero_shot/{task}")}
    if published["method"] != "dense" and published.get("prefill_speedup") is not None:
        row["speed"][bench.speed_key(measured_with)] = {k: published[k] for k in ("prefill_speedup", "decode_speedup")}
    if published["method"] != "dense" and published.get("llamacpp_pp_speedup") is not None:
        row["llamacpp"][bench.llamacpp_key(measured_with)] = {
            "pp_speedup": published["llamacpp_pp_speedup"], "tg_speedup": published["llamacpp_tg_speedup"],
            "pp": published["llamacpp_pp"], "tg": published["llamacpp_tg"]}
    row.update(params=published["params"], time_s=published["time_s"], machines=dict(published.get("machines") or {}))
    for key in ("dtype", "train_dtype", "calib_tokens", "recovery_tokens"):
        if published.get(key) is not None:
            row[key] = published[key]
    if published.get("chosen_seed") is not None:
        row["info"] = {"chosen_seed": published["chosen_seed"]}


def restore_rows(bench, results: dict, path: str, planned: list[tuple[str, float, int, int]]) -> int:
    """Writes a cache row for every planned (method, budget, recovery steps, seed) row that the file at `path`
    (read by `read_results`) holds, under the same cache name (same model, settings and recipes; for an adopted
    search, its `recipe_name`), and the cache does not. Returns how many."""
    # an adopted search's row also answers to the name it has without --adopt when it is that recipe's search
    by_name = {r["recipe_name"]: r for r in results["rows"] if r.get("recipe_name")}
    by_name.update({r["name"]: r for r in results["rows"]})
    restored = 0
    for method, budget, recovery, seed in planned:
        row = bench.load_row(method, budget, recovery, seed)
        published = by_name.get(row["name"])
        if published is None or os.path.isfile(bench.row_path(row["name"])):
            continue  # not in the file, or cached already (the cache wins)
        _row_from_report(bench, row, published, results["settings"])
        row["restored_from"] = os.path.abspath(path)
        bench.save_row(row)
        restored += 1
    return restored
