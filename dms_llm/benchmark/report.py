"""The benchmark's report: which machine measured what, the Markdown table, the JSON, and the plot of
perplexity and zero-shot average against the parameter fraction."""

from __future__ import annotations

import functools
import os
import platform
import shlex
import sys

from ..files import write_atomic, write_json_atomic, write_text_atomic


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
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_outputs(bench, rows: list[dict], argv) -> dict:
    a = bench.args
    by_part: dict = {}
    for r in rows:
        for part, name in r.get("machines", {}).items():
            by_part.setdefault(part, set()).add(name)
    report = {"model": a.model, "machine": machine(), "machines": {k: sorted(v) for k, v in sorted(by_part.items())},
              "command": "dms-llm benchmark " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "settings": {k: getattr(a, k) for k in ("budgets", "methods", "calib_dataset", "calib_samples", "seq_len", "ppl",
                                                       "protocols", "max_windows", "tasks", "limit", "dms_config", "dms_restarts",
                                                       "recovery_steps", "recovery_config", "speed_reps", "dtype", "train_dtype",
                                                       "device", "seed")},
              "rows": [bench.report_row(r) for r in rows]}
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, a.label)
    write_json_atomic(base + ".json", report, indent=1)
    write_text_atomic(base + ".md", markdown(report))
    plot(report, base + ".png")
    return report
