"""The benchmark's report: which machine measured what, the Markdown table, the JSON, and the plot of
perplexity and zero-shot average against the parameter fraction."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shlex
import sys

from ..files import write_atomic, write_json_atomic, write_text_atomic
from ..markdown import table, table_row
from .row import Row


def note_machine(row: Row, part: str, cell: str | None = None) -> None:
    """Which machine built or measured this part of the row (build, ppl, zero_shot, speed): a cache can be
    filled on several. A perplexity `cell` (e.g. `ptb/sparsegpt`) measured on another machine than the
    row's earlier cells is named on its own (`ppl/ptb/sparsegpt`)."""
    machines = row.setdefault("machines", {})
    if cell is not None and machines.get(part, machine()) != machine():
        machines[f"{part}/{cell}"] = machine()
    else:
        machines[part] = machine()


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
    return (f"{cpu}; {os.cpu_count()} logical CPUs; {device}; {platform.system()} {platform.release()}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def _cell(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


# ----- DMS over its seeds: the median per cell, and the spread ---------------------------------------

_SCALARS = ("params", "zero_shot_avg", "zero_shot_avg_stderr", "prefill_speedup", "decode_speedup", "llamacpp_pp_speedup",
            "llamacpp_tg_speedup", "llamacpp_pp", "llamacpp_tg", "time_s", "calib_tokens")


def _leaves(row: dict) -> dict:
    """{path: value} of every numeric cell of a report row (paths are tuples: ("ppl", label, column), ...)."""
    out = {(k,): row[k] for k in _SCALARS if k in row}
    for label, by in row.get("ppl", {}).items():
        for column, v in by.items():
            out[("ppl", label, column)] = v
    for task, m in row.get("zero_shot", {}).items():
        for k in ("value", "stderr"):
            if k in m:
                out[("zero_shot", task, k)] = m[k]
    return out


def _put(target: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def seed_summary(rows: list[dict], method: str = "dms") -> list[dict]:
    """The rows of `method` (one per seed) grouped by (budget, recovery). For each group: the seeds, and a
    row-like `median`, `min` and `max` holding, cell by cell, the median (the middle value of an odd count,
    the mean of the two middle values of an even one), the smallest and the largest value over the seeds;
    `max_over_min` holds max/min of every perplexity cell (the spread). A cell is summarised once every seed
    has it (else None), so a benchmark still running shows no median of fewer seeds."""
    groups: dict = {}
    for r in rows:
        if r["method"] == method:
            groups.setdefault((r["budget"], r["recovery"]), []).append(r)
    out = []
    for (budget, recovery), group in groups.items():
        leaves = [_leaves(r) for r in group]
        paths = list(dict.fromkeys(p for lv in leaves for p in lv))
        seeds = [r.get("seed") for r in group]
        agg = {"method": method, "budget": budget, "recovery": recovery, "seeds": seeds, "max_over_min": {}}
        for part in ("median", "min", "max"):
            agg[part] = {"method": method, "budget": budget, "recovery": recovery, "seed": None, "seeds": seeds,
                         "ppl": {}, "zero_shot": {}, **{k: None for k in _SCALARS if any(k in r for r in group)}}
        for path in paths:
            values = [lv.get(path) for lv in leaves]
            if any(v is None for v in values):
                for part in ("median", "min", "max"):
                    _put(agg[part], path, None)
                continue
            _put(agg["median"], path, _median(values))
            _put(agg["min"], path, min(values))
            _put(agg["max"], path, max(values))
            if path[0] == "ppl" and min(values) > 0:
                _put(agg["max_over_min"], path[1:], max(values) / min(values))
        out.append(agg)
    return out


def main_cells(settings: dict) -> list[tuple[str, str]]:
    """The main perplexity cells, (dataset, protocol) for --ppl x --protocols, as the tables and plots show them."""
    return [(d, p) for d in settings.get("ppl") or [] for p in settings.get("protocols") or []]


def is_curve(row: dict) -> bool:
    """A row of the recovery curve (--recovery-curve), which the main table, plot and seed summary leave out."""
    return row.get("curve_tokens") is not None


def curve_lines(report: dict) -> list[str]:
    """The recovery curve's table: a line per curve row, by method, budget and tokens, with its main perplexity
    cells (--ppl x --protocols)."""
    rows = sorted((r for r in report["rows"] if is_curve(r)), key=lambda r: (r["method"], -r["budget"], r["curve_tokens"]))
    settings = report["settings"]
    main = main_cells(settings)
    head = ["method", "budget", "seed", "recovery tokens"] + [f"{d} ppl ({p})" for d, p in main]
    out = table(head)
    for r in rows:
        tokens = r.get("recovery_tokens") or r["curve_tokens"]
        out.append(table_row([r["method"], f"{r['budget']:g}", "–" if r.get("seed") is None else str(r["seed"]), f"{tokens:,}"]
                             + [_cell(_get(r, ("ppl", d, p))) for d, p in main]))
    return out


def curve_plot(report: dict, path: str) -> bool:
    """Perplexity against recovery tokens (log scale), a panel per main perplexity cell and a line per method and
    budget: the recovery curve. False (and no file) without curve rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in report["rows"] if is_curve(r)]
    settings = report["settings"]
    main = main_cells(settings)
    if not rows or not main:
        return False
    fig, axes = plt.subplots(1, len(main), figsize=(5.2 * len(main), 4.2), squeeze=False)
    for ax, (d, p) in zip(axes[0], main):
        for i, key in enumerate(dict.fromkeys((r["method"], r["budget"]) for r in rows)):
            pts = sorted((r.get("recovery_tokens") or r["curve_tokens"], _get(r, ("ppl", d, p))) for r in rows
                         if (r["method"], r["budget"]) == key and _get(r, ("ppl", d, p)) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{key[0]} at {key[1]:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # ticks at the curve's points, and plain perplexities: a narrow log range otherwise shows only 8.5 x 10^1
        ax.set_xticks(sorted({r.get("recovery_tokens") or r["curve_tokens"] for r in rows}))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_tokens_label))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("recovery fine-tuning tokens")
        ax.set_ylabel(f"{d} perplexity ({p})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']}: perplexity as recovery reads more tokens")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def _tokens_label(tokens: float, _=None) -> str:
    """65536 -> 64k, 262144 -> 256k (the curve's points are powers of two), 1,000,192 -> 1M: three significant
    digits, since a run's token count rounds its last batch up."""
    if tokens >= 1e6:
        return f"{tokens / 1e6:.3g}M"
    if tokens >= 1e3:
        return f"{tokens / 1024:.0f}k" if tokens % 1024 == 0 else f"{tokens / 1e3:.3g}k"
    return f"{tokens:.0f}"


def display_rows(report: dict) -> list[tuple[dict, dict | None]]:
    """The table's rows in order: (row, None) for a single row; (median row, summary) in place of the rows
    of a method with two or more seeds at one budget and recovery."""
    summaries = {(s["method"], s["budget"], s["recovery"]): s for s in report.get("seed_summary", []) if len(s["seeds"]) > 1}
    out, seen = [], set()
    for r in report["rows"]:
        if is_curve(r):
            continue  # in the recovery curve's own table and plot
        key = (r["method"], r["budget"], r["recovery"])
        if key in summaries:
            if key not in seen:
                seen.add(key)
                out.append((summaries[key]["median"], summaries[key]))
        else:
            out.append((r, None))
    return out


def _get(row: dict, path: tuple):
    for key in path:
        if not isinstance(row, dict):
            return None
        row = row.get(key)
    return row


def summary_lines(report: dict) -> list[str]:
    """The headline table: a line per method and budget with its one-shot and recovered perplexity (the main
    --ppl x --protocols cells) and zero-shot average side by side; DMS with several seeds as its median. The
    best pruned value of each column at each budget is bold (lowest perplexity, highest accuracy) once every
    method of that budget has it."""
    settings = report["settings"]
    main = main_cells(settings)
    shown = display_rows(report)
    recovered = any(r["recovery"] for r, _ in shown)
    tasks = any(r.get("zero_shot_avg") is not None for r, _ in shown)
    lines_of: dict = {}
    for r, summary in shown:
        lines_of.setdefault((r["method"], r["budget"]), {})[bool(r["recovery"])] = (r, summary)
    columns = [(False, ("ppl", d, p)) for d, p in main] + ([(False, ("zero_shot_avg",))] if tasks else [])
    if recovered:
        columns += [(True, ("ppl", d, p)) for d, p in main] + ([(True, ("zero_shot_avg",))] if tasks else [])

    def value(key, rec, path):
        entry = lines_of[key].get(rec)
        return None if entry is None else _get(entry[0], path)

    best = {}  # only where every method of the budget has the cell: a best of those measured so far would mislead
    for budget in dict.fromkeys(b for m, b in lines_of if m != "dense"):
        for rec, path in columns:
            values = [value((m, b), rec, path) for (m, b) in lines_of if m != "dense" and b == budget]
            if values and None not in values:
                best[(budget, rec, path)] = max(values) if path[0] == "zero_shot_avg" else min(values)
    head = ["method", "budget", "params (M)"]
    for rec, path in columns:
        name = "zero-shot avg" if path[0] == "zero_shot_avg" else f"{path[1]} ({path[2]})"
        head.append(name + (", recovered" if rec else ""))
    out = table(head)
    for (method, budget), entries in lines_of.items():
        first, summary = entries.get(False) or entries[True]
        name = f"{method} (median of {len(summary['seeds'])} seeds)" if summary else method
        c = [name, "–" if method == "dense" else f"{budget:g}", _cell(first["params"] / 1e6 if first["params"] else None)]
        for rec, path in columns:
            v = value((method, budget), rec, path)
            scale = 100 if path[0] == "zero_shot_avg" else 1
            text = _cell(None if v is None else scale * v)
            c.append(f"**{text}**" if v is not None and method != "dense" and v == best.get((budget, rec, path)) else text)
        out.append(table_row(c))
    return out


def markdown(report: dict) -> str:
    rows = report["rows"]
    dense = next((r["params"] for r in rows if r["method"] == "dense"), None)
    ppl_cols = list(dict.fromkeys((d, p) for r in rows for d, by in r["ppl"].items() for p in by))
    tasks = list(dict.fromkeys(t for r in rows for t in r["zero_shot"]))
    llamacpp = any("llamacpp_pp_speedup" in r for r in rows)
    head = ["method", "budget", "recovery", "seed", "params (M)", "% dense"] + [f"{d} ppl ({p})" for d, p in ppl_cols]
    head += tasks + (["zero-shot avg ± SE"] if tasks else []) + ["prefill ×", "decode ×"]
    head += (["llama.cpp pp ×", "llama.cpp tg ×"] if llamacpp else []) + ["prune time (s)", "calibration tokens"]
    machines = report.get("machines") or {}
    where = [f"Machine: {report['machine']}"] if len({m for ms in machines.values() for m in ms} | {report["machine"]}) == 1 else [
        "Machines (by what they measured): " + "; ".join(f"{part}: {' / '.join(ms)}" for part, ms in machines.items())]

    def line(r: dict, summary: dict | None) -> str:
        def cell(path, fmt="{:.2f}", scale=1.0):
            v = _get(r, path)
            text = _cell(None if v is None else scale * v, fmt)
            if summary is not None and v is not None:
                lo, hi = _get(summary["min"], path), _get(summary["max"], path)
                if lo is not None and hi is not None and fmt.format(scale * lo) != fmt.format(scale * hi):
                    text += f" ({fmt.format(scale * lo)}–{fmt.format(scale * hi)})"
            return text

        if summary is not None:
            name, seed = f"{r['method']} (median of {len(summary['seeds'])} seeds)", ",".join(str(s) for s in summary["seeds"])
        else:
            name = r["method"]
            seed = "–" if r.get("seed") is None else str(r["seed"])
            if r.get("chosen_seed") is not None:
                seed += f" (kept {r['chosen_seed']})"
        params = r["params"]
        c = [name, "–" if r["method"] == "dense" else f"{r['budget']:g}", "yes" if r["recovery"] else "no", seed,
             cell(("params",), scale=1e-6) if params else "–", _cell(100 * params / dense if dense and params else None, "{:.1f}")]
        c += [cell(("ppl", d, p)) for d, p in ppl_cols]
        c += [cell(("zero_shot", t, "value"), scale=100) for t in tasks]
        if tasks:
            avg = cell(("zero_shot_avg",), scale=100)
            se = r.get("zero_shot_avg_stderr")
            if r.get("zero_shot_avg") is not None and se is not None:
                parts = avg.split(" ", 1)  # "median (min–max)" -> "median ± SE (min–max)"
                avg = f"{parts[0]} ± {100 * se:.2f}" + (f" {parts[1]}" if len(parts) > 1 else "")
            c.append(avg)
        c += [cell(("prefill_speedup",)), cell(("decode_speedup",))]
        if llamacpp:
            c += [cell(("llamacpp_pp_speedup",)), cell(("llamacpp_tg_speedup",))]
        c += [cell(("time_s",), "{:.1f}"), cell(("calib_tokens",), "{:,.0f}")]
        return table_row(c)

    table_head = table(head)
    lines = [f"# Benchmark: {report['model']}", ""] + where + ["", "```bash", report["command"], "```", ""]
    lines += ["## Summary", ""] + summary_lines(report) + ["", "## Every row", ""] + table_head
    lines += [line(r, summary) for r, summary in display_rows(report)]
    multi = [s for s in report.get("seed_summary", []) if len(s["seeds"]) > 1]
    lines += ["", _notes(report, tasks, llamacpp, multi)]
    if multi:
        lines += ["", "## DMS over its seeds", ""] + _seed_spread(multi)
        lines += ["", "With recovery, the time is the search's plus the fine-tuning's. Each seed:", ""] + table_head
        lines += [line(r, None) for r in rows if not is_curve(r) and any(
            r["method"] == s["method"] and r["budget"] == s["budget"] and r["recovery"] == s["recovery"] for s in multi)]
    if any(is_curve(r) for r in rows):
        lines += ["", "## Recovery curve", "", "Each point a fine-tuning run of that many tokens with the curve's recipe "
                  f"({report['settings'].get('recovery_curve_config') or report['settings'].get('recovery_config') or 'the default'}); "
                  "under a constant learning rate a point continues the shorter one before it (the same steps, not rerun); "
                  "DMS: the seed whose one-shot row has the median perplexity. Plot: the `-curve.png` beside this file.", ""]
        lines += curve_lines(report)
    return "\n".join(lines) + "\n"


def _notes(report: dict, tasks: list, llamacpp: bool, multi: list) -> str:
    """The paragraph under the table: how each column was measured."""
    settings = report["settings"]
    notes = ["Perplexity: dms_llm.evaluation (non-overlapping windows; llm-pruner = 128 tokens, sparsegpt = 2048)"]
    cells = settings.get("ppl_cells")
    if cells:
        notes[-1] += "; columns: " + "; ".join(cells)
    elif settings.get("max_windows"):
        notes[-1] += f", first {settings['max_windows']} windows only"
    if tasks:
        notes.append("Zero-shot: lm-eval 0-shot accuracy in %" + (f" on the first {settings['limit']} documents per task"
                                                                 if settings.get("limit") else "")
                     + "; the average's standard error is sqrt(sum of the tasks' squared standard errors) / number of "
                       "tasks (lm-eval's per-task standard errors, the tasks taken as independent)")
    notes.append("Speed: tokens/s relative to dense (interleaved runs, medians; prefill batch 1, decode batch 1 with KV cache)")
    if llamacpp:
        lc = settings.get("llamacpp") or {}
        notes.append(f"llama.cpp: {lc.get('outtype', 'q8_0')} GGUF files, {lc.get('threads', 1)} thread(s); prompt processing "
                     f"of {lc.get('pp')} tokens and generation of {lc.get('tg')} tokens in tokens/s relative to dense (the two "
                     f"models interleaved, {lc.get('reps')} repetitions, medians)")
    notes.append("Prune time: wall time of the plan (baselines, calibration pass included) or of the DMS search loop;"
                 " with recovery, plus the fine-tuning")
    if multi:
        notes.append("DMS rows with several seeds: each cell is the median over the seeds, with (smallest–largest) "
                     "beside it when they differ; every seed's own row is below and in the JSON")
    return ". ".join(notes) + "."


def _seed_spread(multi: list) -> list[str]:
    """How far the seeds of each multi-seed DMS row lie apart (largest / smallest value per cell)."""
    spread_cols = list(dict.fromkeys((d, p) for s in multi for d, by in s["max_over_min"].items() for p in by))
    rows = []
    for s in multi:
        t = [_get(s[part], ("time_s",)) for part in ("median", "min", "max")]
        c = [f"{s['budget']:g}", "yes" if s["recovery"] else "no", ",".join(str(x) for x in s["seeds"])]
        c += [_cell(_get(s["max_over_min"], (d, p)), "{:.3f}") for d, p in spread_cols]
        c.append("–" if None in t else f"{t[0]:.1f} ({t[1]:.1f}–{t[2]:.1f})")
        rows.append(c)
    head = ["budget", "recovery", "seeds"] + [f"{d} ({p}) max/min" for d, p in spread_cols]
    return table(head + ["search time (s): median (min–max)"], rows)


OFF_SCALE = 50.0  # perplexity panels end at this many times dense: one collapsed model would squash the rest


def plot_panels(report: dict) -> list[dict]:
    """What the plot draws: a panel per main perplexity cell (--ppl x --protocols) and one for the zero-shot
    average, each with a series per method and recovery (DMS with several seeds: its median) against the
    fraction of dense parameters. A perplexity above OFF_SCALE x dense is drawn at that line and flagged."""
    rows = [r for r, _ in display_rows(report)]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    dense_params = dense["params"] if dense else max((r["params"] or 0 for r in rows), default=0)
    settings = report.get("settings", {})
    cells = main_cells(settings)
    cells = cells or list(dict.fromkeys((d, p) for r in rows for d, by in r["ppl"].items() for p in by))
    kinds = [("ppl", d, p) for d, p in cells] + [("zero_shot_avg",)]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    panels = []
    for path in kinds:
        scale = 100.0 if path[0] == "zero_shot_avg" else 1.0
        ref = _get(dense, path) if dense else None
        cap = OFF_SCALE * ref if ref is not None and path[0] == "ppl" else None
        series = []
        for m in methods:
            for rec in (False, True):
                measured = ((r["params"], _get(r, path)) for r in rows
                            if r["method"] == m and bool(r["recovery"]) == rec and r["params"])
                pts = sorted((n / dense_params, y) for n, y in measured if y is not None)
                if pts:
                    series.append({"method": m, "recovery": rec, "x": [x for x, _ in pts],
                                   "y": [scale * min(y, cap) if cap else scale * y for _, y in pts],
                                   "off_scale": [cap is not None and y > cap for _, y in pts]})
        panels.append({"path": path, "dense": None if ref is None else scale * ref, "cap": cap, "series": series})
    return panels


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report["rows"]:
        return  # nothing measured yet: no plot
    panels = plot_panels(report)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    methods = list(dict.fromkeys(s["method"] for p in panels for s in p["series"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, panel in zip(axes[0], panels):
        for s in panel["series"]:
            # recovered: dashed and hollow, so that a table of one budget (a point per series) still tells them apart
            ax.plot(s["x"], s["y"], marker="o", ls="--" if s["recovery"] else "-", color=colors[s["method"]],
                    mfc="white" if s["recovery"] else colors[s["method"]],
                    label=s["method"] + (" + recovery" if s["recovery"] else ""))
            off = [(x, y) for x, y, o in zip(s["x"], s["y"], s["off_scale"]) if o]
            if off:
                ax.plot(*zip(*off), marker="^", ms=10, ls="", color=colors[s["method"]])
        if panel["dense"] is not None:
            ax.plot([1.0], [panel["dense"]], marker="*", ms=12, color="k", ls="", label="dense")
        ax.set_xlabel("parameters (fraction of dense)")
        kind = panel["path"]
        if kind[0] == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel(f"{kind[1]} perplexity ({kind[2]})")
            if panel["cap"] is not None and any(any(s["off_scale"]) for s in panel["series"]):
                ax.set_title(f"\u25b2: above {OFF_SCALE:g}x dense, drawn at that line", fontsize=8)
        else:
            ax.set_ylabel("zero-shot average accuracy (%)")
            if not panel["series"] and panel["dense"] is None:
                ax.text(0.5, 0.5, "no zero-shot tasks run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    legend = {}  # one legend for every panel, beside them: inside, it hid points
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.suptitle(f"{report['model']}: structured pruning at equal parameter budgets")
    fig.tight_layout(rect=(0, 0, 0.87 if legend else 1, 1))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_outputs(bench, rows: list[Row], argv) -> dict:
    a = bench.args
    by_part: dict = {}
    for r in rows:
        for part, name in r.get("machines", {}).items():
            by_part.setdefault(part, set()).add(name)
    report = {"model": a.model, "machine": machine(), "machines": {k: sorted(v) for k, v in sorted(by_part.items())},
              "command": "dms-llm benchmark " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "settings": {k: getattr(a, k) for k in ("budgets", "methods", "calib_dataset", "calib_samples", "seq_len", "ppl",
                                                       "protocols", "max_windows", "tasks", "limit", "dms_config", "dms_restarts",
                                                       "recovery_steps", "recovery_config", "recovery_curve",
                                                       "recovery_curve_config", "speed_reps", "speed_seq_len",
                                                       "speed_new_tokens", "dtype", "train_dtype",
                                                       "device", "seed")},
              "rows": [bench.report_row(r) for r in rows]}
    report["settings"].update(dms_seeds=list(getattr(a, "dms_seeds", None) or [a.seed]), align=a.align,
                              dms_steps={f"{b:g}": n for b, n in (getattr(a, "dms_steps", None) or {}).items()},
                              dms_budget_config={f"{b:g}": f for b, f in (getattr(a, "dms_budget_config", None) or {}).items()},
                              ppl_cells=[cell.describe() for cell in bench.ppl_cells],
                              ppl_cell_specs=[dataclasses.asdict(cell) for cell in bench.ppl_cells])
    if getattr(a, "llamacpp", False):
        report["settings"]["llamacpp"] = {"outtype": a.llamacpp_outtype, "threads": a.llamacpp_threads, "reps": a.llamacpp_reps,
                                          "pp": a.llamacpp_pp, "tg": a.llamacpp_tg}
    report["seed_summary"] = seed_summary([r for r in report["rows"] if not is_curve(r)])
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, a.label)
    write_json_atomic(base + ".json", report, indent=1)
    write_text_atomic(base + ".md", markdown(report))
    plot(report, base + ".png")
    curve_plot(report, base + "-curve.png")
    return report
