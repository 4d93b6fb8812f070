"""Everything together: `evaluate_model` (perplexity on every dataset and protocol, zero-shot on every
task) and its results as JSON + a Markdown table (`write_results`), with the dense model as the first
row and the differences to it."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..budget import count_parameters
from ..files import write_text_atomic
from ..markdown import table, table_row
from ..passes import model_device
from .perplexity import PROTOCOLS, _model_dtype, check_ppl_datasets, check_protocols, perplexity
from .zero_shot import ZERO_SHOT_TASKS, check_tasks, zero_shot

logger = logging.getLogger(__name__)

_PRETTY = {
    "wikitext2": "WikiText-2",
    "wikitext2-valid": "WikiText-2 valid",
    "ptb": "PTB test",
    "ptb-valid": "PTB valid",
    "c4": "C4",
    "c4-train-sample": "C4 train sample",
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}


def evaluate_model(model, tokenizer, ppl: Sequence[str] | str = ("wikitext2",), protocols: Sequence[str] | str = ("llm-pruner",),
                   tasks: Sequence[str] | str = (), data_dir=None, limit: int | float | None = None,
                   batch_size: int = 8, max_windows: int | None = None, seed: int = 0, source: str = "auto",
                   model_name: str | None = None, progress: bool = True,
                   on_part_done: Callable[[dict], None] | None = None) -> dict:
    """Perplexity on every (dataset, protocol) and zero-shot on every task; returns the results dict
    (`write_results` stores it). `on_part_done(results)` is called after each part, for checkpointing."""
    import lm_eval

    ppl, protocols, tasks = check_ppl_datasets(ppl), check_protocols(protocols), check_tasks(tasks)
    if ppl and not protocols:
        raise ValueError("perplexity datasets given but no protocol")
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    set_seed(seed)
    name = model_name or getattr(model, "name_or_path", None) or "<in-memory model>"
    results: dict[str, Any] = {
        "format": "dms_eval/1",
        "model": str(name),
        "params": count_parameters(model),
        "dtype": _model_dtype(model),
        "device": str(model_device(model)),
        "seed": seed,
        "limit": limit,
        "max_windows": max_windows,
        "source_mode": source,
        "data_sources": {},
        "ppl": {},
        "ppl_details": {},
        "zero_shot": {},
        "zero_shot_avg": None,
        "time_s": {"ppl": {}, "zero_shot": {}},
        "versions": {
            "lm_eval": getattr(lm_eval, "__version__", None),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "datasets": _version("datasets"),
            "python": platform.python_version(),
        },
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_threads": torch.get_num_threads(),
    }
    for dataset in ppl:
        for protocol in protocols:
            r = perplexity(model, tokenizer, dataset, protocol, data_dir=data_dir, batch_size=batch_size,
                           max_windows=max_windows, source=source, progress=progress)
            label = r["label"]
            results["ppl"].setdefault(label, {})[protocol] = r["ppl"]
            results["ppl_details"].setdefault(label, {})[protocol] = {k: v for k, v in r.items() if k != "source"}
            results["data_sources"][f"ppl/{label}"] = r["source"]
            results["time_s"]["ppl"].setdefault(label, {})[protocol] = r["time_s"]
            logger.info("%s %s perplexity %.3f (%d windows, %.1f s)", label, protocol, r["ppl"], r["n_windows"], r["time_s"])
            if on_part_done:
                on_part_done(results)
    def task_done(key: str, metrics: dict, record: dict, seconds: float) -> None:
        results["zero_shot"][key] = metrics
        results["data_sources"][f"zero_shot/{key}"] = record
        results["time_s"]["zero_shot"][key] = seconds
        values = [m["value"] for m in results["zero_shot"].values() if m.get("value") is not None]
        results["zero_shot_avg"] = sum(values) / len(values) if values else None
        if on_part_done:
            on_part_done(results)

    zero_shot(model, tokenizer, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size, seed=seed,
              source=source, on_task_done=task_done)
    results["time_s"]["total"] = round(time.perf_counter() - t_start, 2)
    return results


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _fmt(value, scale: float = 1.0, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * scale:+.2f}" if signed else f"{value * scale:.2f}"


def results_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table with one row per results dict. With two or more rows the first is the reference
    (the dense baseline) and each later row is followed by its difference to it."""
    rows = list(rows)
    if not rows:
        return ""
    ppl_cols: list[tuple[str, str]] = []
    for r in rows:
        for label, by_protocol in r.get("ppl", {}).items():
            for protocol in by_protocol:
                if (label, protocol) not in ppl_cols:
                    ppl_cols.append((label, protocol))
    task_cols = [t for t in ZERO_SHOT_TASKS if any(t in r.get("zero_shot", {}) for r in rows)]
    def window(label: str, protocol: str):
        # The real window length (a model with a short context caps the protocol's), from the details.
        for r in rows:
            detail = r.get("ppl_details", {}).get(label, {}).get(protocol, {})
            if "seq_len" in detail:
                return detail["seq_len"]
        return PROTOCOLS.get(protocol, protocol)

    header = ["model", "params (M)"]
    header += [f"{_PRETTY.get(label, label)} ppl ({window(label, p)})" for label, p in ppl_cols]
    header += [f"{_PRETTY.get(t, t)} {ZERO_SHOT_TASKS[t][2]}" for t in task_cols]
    if task_cols:
        header.append("avg")

    def cells(r: dict) -> list[str]:
        c = [f"`{Path(str(r.get('model', '?'))).name or r.get('model')}`", f"{r.get('params', 0) / 1e6:.2f}"]
        c += [_fmt(r.get("ppl", {}).get(label, {}).get(p)) for label, p in ppl_cols]
        c += [_fmt(r.get("zero_shot", {}).get(t, {}).get("value"), 100) for t in task_cols]
        if task_cols:
            c.append(_fmt(r.get("zero_shot_avg"), 100))
        return c

    def diff(r: dict, ref: dict) -> list[str]:
        def d(a, b, scale=1.0):
            return "–" if a is None or b is None else _fmt(a - b, scale, signed=True)

        p0, p1 = ref.get("params") or 0, r.get("params") or 0
        c = ["Δ vs first row", f"{(p1 - p0) / p0 * 100:+.1f}%" if p0 else "–"]
        c += [d(r.get("ppl", {}).get(l, {}).get(p), ref.get("ppl", {}).get(l, {}).get(p)) for l, p in ppl_cols]
        c += [d(r.get("zero_shot", {}).get(t, {}).get("value"), ref.get("zero_shot", {}).get(t, {}).get("value"), 100)
              for t in task_cols]
        if task_cols:
            c.append(d(r.get("zero_shot_avg"), ref.get("zero_shot_avg"), 100))
        return c

    lines = table(header)
    for i, r in enumerate(rows):
        lines.append(table_row(cells(r)))
        if i > 0:
            lines.append(table_row(diff(r, rows[0])))
    notes = [
        "",
        "Perplexity: non-overlapping windows of the given length (llm-pruner 128, sparsegpt 2048), final partial "
        "window dropped, exp of the mean NLL over all predicted tokens. Zero-shot: lm-eval "
        f"{rows[0].get('lm_eval_version')}, 0-shot, accuracy in %.",
    ]
    if any(label == "c4-train-sample" for label, _ in ppl_cols):
        notes.append("C4 train sample: C4 *train* documents (offline stand-in), not the C4 validation split.")
    limits = {r.get("limit") for r in rows} - {None}
    if limits:
        notes.append(f"Zero-shot on the first {', '.join(map(str, sorted(limits, key=str)))} documents of each task "
                     "(--limit), not the full splits.")
    mw = {r.get("max_windows") for r in rows} - {None}
    if mw:
        notes.append(f"Perplexity on the first {', '.join(map(str, sorted(mw)))} windows only (--max-windows).")
    return "\n".join(lines + notes) + "\n"


def write_results(results: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes results.json and results.md. `out` is a folder (files named results.*) or a .json path (the
    Markdown goes next to it). Refuses to replace the results of a different model unless overwrite."""
    out = Path(out)
    json_path = out if out.suffix == ".json" else out / "results.json"
    md_path = json_path.with_suffix(".md")
    check_output(json_path, results.get("model"), results.get("params"), overwrite=overwrite)
    rows = [results["baseline"], results] if results.get("baseline") else [results]
    write_text_atomic(str(json_path), json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(str(md_path), results_markdown(rows))
    return json_path


def check_output(json_path: str | os.PathLike, model: str | None, params: int | None = None, overwrite: bool = False) -> None:
    """Raises if json_path holds the results of another model (by name, and by size when both known)."""
    json_path = Path(json_path)
    if overwrite or not json_path.is_file():
        return
    try:
        old = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FileExistsError(f"{json_path} exists and is not a results file; choose another --output or pass --overwrite")
    same = old.get("model") == model and (params is None or old.get("params") in (None, params))
    if not same:
        raise FileExistsError(
            f"{json_path} holds the results of another model ({old.get('model')}, {old.get('params')} params); "
            f"refusing to replace them with {model}. Choose another --output or pass --overwrite."
        )


def ppl_change_lines(results: dict, before: dict | None) -> list[str]:
    """'perplexity DATASET (PROTOCOL): BEFORE -> AFTER' for each value of `results` (for console reports)."""
    lines = []
    for ds, by_protocol in results.get("ppl", {}).items():
        for protocol, value in by_protocol.items():
            old = (before or {}).get("ppl", {}).get(ds, {}).get(protocol)
            lines.append(f"perplexity {ds} ({protocol}): " + (f"{old:.2f} -> {value:.2f}" if old else f"{value:.2f}"))
    return lines
