"""Prune or quantize harder? The size / quality / speed frontier of GGUF files, dense against pruned.

    OMP_NUM_THREADS=1 python eval/bench_quant.py --model dense=smollm2-135m --model dms-80=runs/dms80-rec \
        --work runs/quant --output eval/results/quant_frontier_smollm2-135m

For every (model, type): the GGUF file written by `dms_llm.export.export_gguf` (the k-quants by
llama.cpp's own quantizer) and its size; WikiText-2 and PTB test perplexity in llama.cpp (128-token
windows, the first 320 of each, llama.cpp's default f16 KV cache: what a llama.cpp or Ollama user runs);
then prompt processing (512 tokens) and generation (128 tokens) in tokens/s at each thread count, every
file interleaved repetition by repetition, medians (`dms_llm.export.llamacpp.interleaved_speed`, as
eval/bench_llamacpp.py). OUTPUT.json is also the cache: each measurement is written to it as soon as it
is taken, and a rerun measures only what is missing (a cell is measured again when its checkpoint's files
change). GGUF files stay in WORK and are reused. OUTPUT.md holds the table, OUTPUT.png the plot:
WikiText-2 perplexity against file size and against generation speed (1 thread), one line per model.
Needs the `llamacpp` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dms_llm.export.llamacpp import checkpoint_key, checkpoint_parameters, gguf_file, interleaved_speed

TYPES = "f16,q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k"
DATASETS = ("wikitext2", "ptb")
WINDOW = 128  # the llm-pruner protocol of dms_llm/evaluation/perplexity.py, as the benchmark's rows


# ----- the results file (also the cache) -------------------------------------------------------------


def load_results(path: str, models: dict, settings: dict, types: list[str], threads: list[int]) -> dict:
    """The results in `path`, less the cells whose checkpoint changed since they were measured and the
    measurements taken under other settings (windows, prompt and generation lengths).
    Cells of models and types not asked for this time are kept (a run can add one model)."""
    from dms_llm.files import read_json

    old = read_json(path) if os.path.isfile(path) else {}
    results = {"settings": settings, "types": list(dict.fromkeys([*types, *old.get("types", [])])),
               "threads": list(dict.fromkeys([*threads, *old.get("threads", [])])), "models": {}, "cells": {}}
    # perplexity depends on the windows, speed on the prompt and generation lengths
    stale = tuple(prefix for prefix, keys in (("ppl_", ("ppl_windows", "window")), ("speed_", ("pp", "tg")))
                  if any((old.get("settings") or {}).get(k) != settings[k] for k in keys))  # fmt: skip
    keys = {name: checkpoint_key(folder) for name, folder in models.items()}
    for cell_id, cell in old.get("cells", {}).items():
        name = cell.get("model")
        if name in keys and cell.get("checkpoint") != keys[name]:
            continue  # the checkpoint changed: its GGUF files and every number are stale
        if stale:  # sizes stay valid
            cell = {k: v for k, v in cell.items() if not k.startswith(stale)}
        results["cells"][cell_id] = cell
    results["models"] = {n: m for n, m in old.get("models", {}).items() if n not in keys}
    return results


def save(results: dict, path: str, own=()) -> None:
    """Write `results`. Other processes may be measuring into the same file (one core each): the cells of
    other models are taken from the file as they are now; the cells of `own` (the models this process
    measures) come from memory, with the measurements another process of the same model wrote meanwhile
    (on other --types, say) added where memory has none, if they are of the same checkpoint."""
    from dms_llm.files import read_json, write_json_atomic

    if os.path.isfile(path):
        disk = read_json(path)
        if disk.get("settings") == results["settings"]:
            for name, model in disk.get("models", {}).items():
                if name not in own:
                    results["models"][name] = model
            for cid, cell in disk.get("cells", {}).items():
                mine = results["cells"].get(cid)
                if cell.get("model") not in own:
                    results["cells"][cid] = cell
                elif mine is not None and mine.get("checkpoint") == cell.get("checkpoint"):
                    mine.update({k: v for k, v in cell.items() if mine.get(k) is None})
    write_json_atomic(path, results)


def fill(results: dict, path: str, cell_id: str, field: str, measure, own=()):
    """results["cells"][cell_id][field], measured (and written to `path` at once) unless already there."""
    cell = results["cells"][cell_id]
    if cell.get(field) is None:
        cell[field] = measure()
        save(results, path, own)
    return cell[field]


def cell_id(model: str, outtype: str) -> str:
    return f"{model}/{outtype}"


# ----- measurements ----------------------------------------------------------------------------------


def windows_for(folder: str, dataset: str, n: int, data_dir: str | None):
    from transformers import AutoTokenizer

    from dms_llm.evaluation import load_ppl_text, make_windows
    from dms_llm.evaluation.perplexity import tokenize_text

    text, _ = load_ppl_text(dataset, data_dir=data_dir, source="local")
    windows, _ = make_windows(tokenize_text(AutoTokenizer.from_pretrained(folder), text), WINDOW, n)
    return windows


def llamacpp_perplexity(path: str, windows) -> float:
    from dms_llm.export import llamacpp

    # llama.cpp's default f16 KV cache (f32_cache=False), as users run the file; one thread
    llm = llamacpp.load(path, n_ctx=WINDOW, threads=1, f32_cache=False)
    try:
        return llamacpp.perplexity(llm, windows)
    finally:
        llm.close()


def export_cell(work: str, name: str, folder: str, outtype: str) -> dict:
    from dms_llm.export.quantize import KQUANTS, fallback_tensors

    start = time.time()
    path = gguf_file(work, name, folder, outtype, threads=1)
    info = {"file": path, "size_bytes": os.path.getsize(path), "export_s": time.time() - start}
    if outtype in KQUANTS:  # matrices whose rows no k-quant holds (576 wide here): llama.cpp's fallback type
        fallback, matrices = fallback_tensors(path, outtype)
        info.update(fallback_matrices=len(fallback), matrices=matrices)
    return info


# ----- table and plot ----------------------------------------------------------------------------------


def rows_of(results: dict) -> list[dict]:
    """One row per measured cell, models and types in the order they were asked for."""
    models = list(results["models"])
    types = results["types"]
    rows = []
    for cell in results["cells"].values():
        if cell.get("model") in models and cell.get("outtype") in types and cell.get("size_bytes"):
            params = results["models"][cell["model"]]["params"]
            rows.append(dict(cell, params=params, bits_per_param=8 * cell["size_bytes"] / params))
    rows.sort(key=lambda r: (models.index(r["model"]), types.index(r["outtype"])))
    return rows


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, perplexity) points: True where no other point is at most as costly and at most as
    perplexed while better in one of the two."""
    return [not any(c <= x and p <= y and (c, p) != (x, y) for c, p in points) for x, y in points]


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(results: dict) -> str:
    rows = rows_of(results)
    threads = results["threads"]
    measured = [r for r in rows if r.get("ppl_wikitext2") is not None]
    front = dict(zip((cell_id(r["model"], r["outtype"]) for r in measured),
                     pareto([(r["size_bytes"], r["ppl_wikitext2"]) for r in measured])))  # fmt: skip
    head = ["model", "type", "file MB", "bits/param", "WikiText-2", "PTB", "on size frontier"]
    for t in threads:
        head += [f"pp{results['settings']['pp']} {t}t tok/s", f"tg{results['settings']['tg']} {t}t tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        on_front = front.get(cell_id(r["model"], r["outtype"]))
        cells = [r["model"], r["outtype"], f"{r['size_bytes'] / 1e6:.1f}", f"{r['bits_per_param']:.2f}",
                 _fmt(r.get("ppl_wikitext2"), ".2f"), _fmt(r.get("ppl_ptb"), ".2f"),
                 "" if on_front is None else ("yes" if on_front else "")]  # fmt: skip
        for t in threads:
            s = r.get(f"speed_t{t}") or {}
            cells += [_fmt(s.get("pp"), ".0f"), _fmt(s.get("tg"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_series(results: dict) -> list[dict]:
    """Per model: its types' (file MB, tg tokens/s at 1 thread, WikiText-2 perplexity), measured ones only."""
    series = {}
    for r in rows_of(results):
        if r.get("ppl_wikitext2") is None:
            continue
        s = series.setdefault(r["model"], {"model": r["model"], "types": [], "mb": [], "tg": [], "ppl": []})
        s["types"].append(r["outtype"])
        s["mb"].append(r["size_bytes"] / 1e6)
        s["tg"].append((r.get("speed_t1") or {}).get("tg"))
        s["ppl"].append(r["ppl_wikitext2"])
    return list(series.values())


def plot(results: dict, path: str) -> bool:
    """Writes the PNG; False (nothing written) when no perplexity is measured yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dms_llm.files import write_atomic

    series = plot_series(results)
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for i, s in enumerate(series):
        for ax, xs in ((axes[0], s["mb"]), (axes[1], s["tg"])):
            pts = [(x, y, t) for x, y, t in zip(xs, s["ppl"], s["types"]) if x is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=s["model"])
            for x, y, t in pts:  # the type beside each point: the line alone does not say which is which
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
    axes[0].set_xlabel("GGUF file size (MB)")
    axes[1].set_xlabel("generation speed, 1 thread (tokens/s)")
    if not any(x is not None for s in series for x in s["tg"]):
        axes[1].text(0.5, 0.5, "speed not measured yet", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel(f"WikiText-2 perplexity (llama.cpp, {WINDOW}-token windows)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Prune or quantize harder: perplexity against size and speed (lower left is better)")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


# ----- the run -----------------------------------------------------------------------------------------


def parse_models(specs: list[str]) -> dict:
    from dms_llm.checkpoints.loading import resolve_model

    models = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or "/" in name:
            raise ValueError(f"--model {spec!r}: expected NAME=CHECKPOINT_DIR (NAME without '/')")
        folder = resolve_model(folder)  # a folder, or an alias such as smollm2-135m (the embedded model)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"--model {spec!r}: {folder} holds no config.json")
        models[name] = folder
    if not models:
        raise ValueError("give at least one --model NAME=CHECKPOINT_DIR")
    return models


def main(argv=None) -> int:
    from dms_llm.runs.options import exit_code

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT_DIR (or an alias); repeatable")
    parser.add_argument("--types", default=TYPES, help="GGUF types (default: %(default)s)")
    parser.add_argument("--threads", default="1,2", help="llama.cpp thread counts of the speed cells (default: %(default)s)")
    parser.add_argument("--work", required=True, help="folder of the GGUF files (kept and reused)")
    parser.add_argument("--output", required=True, help="writes OUTPUT.json (also the cache), OUTPUT.md and OUTPUT.png")
    parser.add_argument("--data-dir", default=os.environ.get("DMS_DATA_DIR"), help="offline data folder")
    parser.add_argument("--ppl-windows", type=int, default=320, help="first N 128-token windows (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per speed cell (default: %(default)s)")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--tg", type=int, default=128, help="generated tokens (default: %(default)s)")
    parser.add_argument("--parts", default="ppl,speed",
                        help="measurements to take: ppl, speed, both, or none (the table and plot from OUTPUT.json); "
                             "files are always exported (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)

    def run() -> int:
        from dms_llm.export import KQUANTS, OUTTYPES
        from dms_llm.files import write_text_atomic

        models = parse_models(args.model)
        types = [t for t in args.types.split(",") if t]
        unknown = [t for t in types if t not in OUTTYPES and t not in KQUANTS]
        if unknown:
            raise ValueError(f"--types: unknown {unknown}; choose from {[*OUTTYPES, *KQUANTS]}")
        threads = [int(t) for t in args.threads.split(",") if t]
        parts = {p for p in args.parts.split(",") if p and p != "none"}
        if parts - {"ppl", "speed"}:
            raise ValueError(f"--parts: unknown {sorted(parts - {'ppl', 'speed'})}; choose from ppl, speed, none")
        # what the numbers depend on: other values make every measurement stale
        settings = {"ppl_windows": args.ppl_windows, "window": WINDOW, "pp": args.pp, "tg": args.tg}
        path = args.output + ".json"
        os.makedirs(args.work, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        results = load_results(path, models, settings, types, threads)
        for name, folder in models.items():
            results["models"][name] = {"folder": folder, "checkpoint": checkpoint_key(folder),
                                       "params": checkpoint_parameters(folder)}  # fmt: skip

        def log(msg: str) -> None:
            print(f"[bench_quant] {msg}", file=sys.stderr, flush=True)

        # every file first (seconds each), then perplexity cell by cell (minutes each), in --types order
        for name, folder in models.items():
            for outtype in types:
                cid = cell_id(name, outtype)
                results["cells"].setdefault(cid, {"model": name, "outtype": outtype, "checkpoint": checkpoint_key(folder)})
                if results["cells"][cid].get("size_bytes") is None or not os.path.isfile(results["cells"][cid]["file"]):
                    log(f"{cid}: export")
                    results["cells"][cid].update(export_cell(args.work, name, folder, outtype))
                    save(results, path, own=models)
        # WikiText-2 of every cell before PTB: the plot needs only WikiText-2
        windows = {}
        for dataset in DATASETS if "ppl" in parts else ():
            for name, folder in models.items():
                for outtype in types:
                    cid = cell_id(name, outtype)

                    def measure(dataset=dataset, cid=cid, name=name, folder=folder):
                        if (name, dataset) not in windows:  # tokenised once per model, only when a cell needs it
                            windows[name, dataset] = windows_for(folder, dataset, args.ppl_windows, args.data_dir)
                        log(f"{cid}: {dataset} perplexity")
                        start = time.time()
                        ppl = llamacpp_perplexity(results["cells"][cid]["file"], windows[name, dataset])
                        log(f"{cid}: {dataset} {ppl:.2f} ({time.time() - start:.0f} s)")
                        return ppl

                    fill(results, path, cid, f"ppl_{dataset}", measure, own=models)
                write_text_atomic(args.output + ".md", table(results) + "\n")

        # speed: every cell still missing at a thread count, interleaved together
        for t in threads if "speed" in parts else ():
            todo = {cid: results["cells"][cid]["file"] for name in models for cid in [cell_id(name, o) for o in types]
                    if results["cells"][cid].get(f"speed_t{t}") is None}  # fmt: skip
            if not todo:
                continue
            log(f"speed at {t} thread(s): {len(todo)} files interleaved, {args.reps} repetitions")
            measured = interleaved_speed(todo, threads=t, reps=args.reps, pp=args.pp, tg=args.tg,
                                         log=lambda msg, t=t: log(f"speed {t}t: {msg}"))  # fmt: skip
            group = time.strftime("%Y-%m-%dT%H:%M:%S")  # cells measured together share it: compare within a group
            for cid in todo:
                results["cells"][cid][f"speed_t{t}"] = dict(measured[cid], clock=measured["clock"], group=group,
                                                            reps=args.reps, load_average_max=measured["load_average_max"])
            save(results, path, own=models)

        markdown = table(results)
        write_text_atomic(args.output + ".md", markdown + "\n")
        plot(results, args.output + ".png")
        print(markdown)
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
