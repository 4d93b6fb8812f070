"""Pruned models in llama.cpp: quality against transformers and speed against the dense model.

    python eval/bench_llamacpp.py --dense smollm2-135m --model dms-80=runs/dms80 --model dms-50=runs/dms50 \
        --work runs/llamacpp --output eval/results/llamacpp_smollm2-135m

For every checkpoint: GGUF files (f32, f16, q8_0) written by `dms-llm export`; WikiText-2 perplexity
(128-token windows, the first 320) of the transformers model and of the f32 and q8_0 files in llama.cpp;
then, for f16 and q8_0 at 1 and 2 threads, prompt processing (a 512-token prompt) and generation (128
tokens) in tokens/s, all models interleaved repetition by repetition, medians. Speed-ups are reported
against the parameter ratio: the goal is prompt processing >= 0.9 x (dense params / pruned params) and
generation >= 0.8 x. Every measured cell is cached in WORK/results.json, so a rerun continues.
Needs the `llamacpp` extra. Timings need an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The GGUF export, the cache key of a checkpoint and the interleaved timing live in the package
# (dms_llm/export/llamacpp.py), shared with `dms-llm benchmark --llamacpp`.
from dms_llm.export.llamacpp import GOALS, checkpoint_key, checkpoint_parameters, gguf_file


class Cache:
    def __init__(self, path: str):
        self.path = path
        self.data = {}
        if os.path.isfile(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value) -> None:
        from dms_llm.files import write_text_atomic

        self.data[key] = value
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def quality(cache: Cache, work: str, name: str, folder: str, data_dir: str | None, windows_n: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dms_llm.evaluation import load_ppl_text, make_windows, window_nll
    from dms_llm.evaluation.perplexity import tokenize_text
    from dms_llm.export import llamacpp

    key = f"quality2/{name}/{checkpoint_key(folder)}/{windows_n}"
    if cache.get(key):
        return cache.get(key)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text, _ = load_ppl_text("wikitext2", data_dir=data_dir, source="local")
    windows, _ = make_windows(tokenize_text(tokenizer, text), 128, windows_n)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tokenizer("The history of the city begins with").input_ids
    with torch.no_grad():
        total, count = window_nll(model, windows, progress=True, desc=f"{name} transformers")
        first_logits = model(windows[:1]).logits[0].numpy()
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0].tolist()  # fmt: skip
    result = {"ppl_transformers": float(torch.tensor(total / count).exp())}
    del model
    for outtype, f32_cache in (("f32", True), ("q8_0", False)):
        llm = llamacpp.load(gguf_file(work, name, folder, outtype), n_ctx=128, f32_cache=f32_cache)
        try:
            result[f"ppl_llamacpp_{outtype}"] = llamacpp.perplexity(llm, windows)
            if outtype == "f32":  # parity on the first window and greedy decoding, f32 file and cache
                got = llamacpp.logits(llm, windows[0].tolist())
                result["logits_max_abs_diff_f32"] = float(abs(got - first_logits).max())
                result["greedy_32_equal_f32"] = llamacpp.greedy(llm, prompt, 32) == greedy
        finally:
            llm.close()
    result["ppl_f32_rel_diff"] = result["ppl_llamacpp_f32"] / result["ppl_transformers"] - 1
    cache.put(key, result)
    return result


def speed(cache: Cache, work: str, models: dict, outtype: str, threads: int, reps: int, pp: int, tg: int) -> dict:
    """{name: {"pp": tokens/s, "tg": tokens/s}} (medians), all models interleaved within each repetition."""
    from dms_llm.export.llamacpp import interleaved_speed

    key = f"speed2/{outtype}/t{threads}/pp{pp}/tg{tg}/r{reps}/" + ",".join(f"{n}:{checkpoint_key(f)}" for n, f in models.items())
    if cache.get(key):
        return cache.get(key)
    files = {n: gguf_file(work, n, f, outtype) for n, f in models.items()}
    result = interleaved_speed(files, threads=threads, reps=reps, pp=pp, tg=tg,
                               log=lambda msg: print(f"  {outtype} {threads} thread(s): {msg}", file=sys.stderr))
    cache.put(key, result)
    return result


def table(rows: list[dict]) -> str:
    head = ["model", "params", "dense/params", "GGUF arch", "ppl transformers", "ppl llama.cpp f32", "ppl q8_0",
            "max logit diff f32", "greedy 32 equal"]
    speed_cols = sorted({k for r in rows for k in r if k.startswith(("pp ", "tg "))})
    lines = ["| " + " | ".join(head + speed_cols) + " |", "|" + "---|" * (len(head) + len(speed_cols))]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['param_ratio']:.2f}x", r["arch"],
                 f"{r['ppl_transformers']:.2f}", f"{r['ppl_llamacpp_f32']:.2f}", f"{r['ppl_llamacpp_q8_0']:.2f}",
                 f"{r['logits_max_abs_diff_f32']:.4f}", "yes" if r["greedy_32_equal_f32"] else "no"]  # fmt: skip
        cells += [r.get(c, "") for c in speed_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from dms_llm.runs.options import exit_code

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="smollm2-135m", help="the dense model: alias or folder (default: %(default)s)")
    parser.add_argument("--model", action="append", default=[], help="NAME=FOLDER of a pruned checkpoint (repeatable)")
    parser.add_argument("--work", required=True, help="GGUF files and the cell cache (results.json)")
    parser.add_argument("--output", help="write OUTPUT.json and OUTPUT.md")
    parser.add_argument("--data-dir", default=os.environ.get("DMS_DATA_DIR"), help="offline data folder")
    parser.add_argument("--ppl-windows", type=int, default=320, help="first N 128-token WikiText-2 windows (default: %(default)s)")
    parser.add_argument("--threads", default="1,2", help="llama.cpp thread counts (default: %(default)s)")
    parser.add_argument("--outtypes", default="f16,q8_0", help="GGUF types timed (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per speed cell (default: %(default)s)")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--tg", type=int, default=128, help="generated tokens (default: %(default)s)")
    args = parser.parse_args(argv)

    def run() -> int:
        from dms_llm.export.gguf import OUTTYPES
        from dms_llm.checkpoints.loading import resolve_model

        models = {"dense": resolve_model(args.dense)}
        for spec in args.model:
            name, sep, folder = spec.partition("=")
            if not sep or not os.path.isdir(folder):
                raise ValueError(f"--model {spec!r}: expected NAME=FOLDER with an existing checkpoint folder")
            models[name] = os.path.abspath(folder)
        outtypes = [t for t in args.outtypes.split(",") if t]
        unknown = [t for t in outtypes if t not in OUTTYPES]
        if unknown:
            raise ValueError(f"--outtypes: unknown {unknown}; choose from {sorted(OUTTYPES)}")
        threads = [int(t) for t in args.threads.split(",") if t]
        os.makedirs(args.work, exist_ok=True)
        cache = Cache(os.path.join(args.work, "results.json"))
        start = time.time()

        rows = []
        dense_params = checkpoint_parameters(models["dense"])
        for name, folder in models.items():
            from dms_llm.export.checkpoint import Checkpoint
            from dms_llm.export.gguf import GGUFPlan

            params = checkpoint_parameters(folder)
            print(f"{name}: quality", file=sys.stderr)
            row = {"model": name, "folder": folder, "params": params, "param_ratio": dense_params / params,
                   "arch": GGUFPlan(Checkpoint(folder), "f32").arch}  # fmt: skip
            row.update(quality(cache, args.work, name, folder, args.data_dir, args.ppl_windows))
            rows.append(row)
        for outtype in outtypes:
            for t in threads:
                print(f"speed: {outtype}, {t} thread(s)", file=sys.stderr)
                measured = speed(cache, args.work, models, outtype, t, args.reps, args.pp, args.tg)
                for row in rows:
                    for kind in ("pp", "tg"):
                        rate = measured[row["model"]][kind]
                        speedup = rate / measured["dense"][kind]
                        row[f"{kind}_{outtype}_t{t}"] = rate
                        row[f"{kind}_{outtype}_t{t}_speedup"] = speedup
                        row[f"{kind}_{outtype}_t{t}_vs_goal"] = speedup / (GOALS[kind] * row["param_ratio"])
                        row[f"{kind} {outtype} {t}t"] = f"{rate:.0f} tok/s ({speedup:.2f}x)"
                        row[f"{kind}_{outtype}_t{t}_clock"] = measured["clock"]
        report = {"rows": rows, "goals": GOALS, "ppl_windows": args.ppl_windows, "pp_tokens": args.pp,
                  "tg_tokens": args.tg, "reps": args.reps, "wall_s": time.time() - start}  # fmt: skip
        markdown = table(rows)
        print(markdown)
        if args.output:
            from dms_llm.files import write_text_atomic

            write_text_atomic(args.output + ".json", json.dumps(report, indent=1))
            write_text_atomic(args.output + ".md", markdown + "\n")
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
