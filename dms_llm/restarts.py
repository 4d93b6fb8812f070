"""Best of several searches (`search.py --restarts N`): one short search follows a noisy gradient (a
batch of a few blocks per step), so searches that differ only in their seed reach architectures whose
test perplexities differ by tens of percent. Running N of them on the same calibration blocks and
keeping the one with the lowest loss on held-out calibration blocks (never an evaluation split) costs N
searches and removes most of that luck.

Each search is an ordinary run in OUT/restarts/seed-S (so each one checkpoints and resumes on its own);
the winner's checkpoint becomes OUT, the others keep their plan, summary and metrics but not their weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from .files import write_text_atomic

RESTARTS_DIR = "restarts"
RECORD_FILE = "restarts.json"


def run_restarts(cfg, run_one) -> dict:
    """Run `cfg.restarts` searches with `run_one` (search.run), keep the best, then evaluate/push it."""
    from accelerate import PartialState

    from .loading import resolve_model
    from .search import check_output_dir, resumable

    state = PartialState()
    out = os.path.abspath(cfg.output_dir)
    source = resolve_model(cfg.model)
    check_output_dir(cfg, source if os.path.isdir(source) else None)
    folder = os.path.join(out, RESTARTS_DIR)
    if state.is_main_process and cfg.overwrite and not cfg.resume and os.path.isdir(out):
        shutil.rmtree(out)
    state.wait_for_everyone()
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed

    candidates = []
    for i in range(cfg.restarts):
        seed = cfg.seed + i
        sub = os.path.join(folder, f"seed-{seed}")
        summary_path = os.path.join(sub, "search_summary.json")
        if not os.path.isfile(summary_path):
            resume = resumable(sub)
            if state.is_main_process:
                print(f"search {i + 1}/{cfg.restarts} (seed {seed}){', resuming' if resume else ''}: {sub}", flush=True)
            sub_cfg = dataclasses.replace(cfg, restarts=1, seed=seed, data_seed=data_seed, output_dir=sub, no_eval=True,
                                          push_to_hub=None, resume=resume, overwrite=not resume)
            if not run_one(sub_cfg).get("finished"):
                return {"finished": False, "restart": i}
        with open(summary_path) as f:
            candidates.append({"seed": seed, "folder": sub, **json.load(f)})

    best = min(candidates, key=lambda c: c["heldout_loss"])
    summary = _summary(best, candidates, out)
    if state.is_main_process:
        _print_scores(candidates, best)
        _install_winner(out, folder, best, candidates, summary)
    state.wait_for_everyone()
    _evaluate_and_push(cfg, out, source, summary, state)
    return summary


def _summary(best: dict, candidates: list[dict], out: str) -> dict:
    summary = {k: v for k, v in best.items() if k not in ("seed", "folder")}
    summary.update(output_dir=out, search_time_s=sum(c["search_time_s"] for c in candidates), chosen_seed=best["seed"],
                   restarts=[{k: c.get(k) for k in ("seed", "heldout_loss", "params", "search_time_s")} for c in candidates])
    return summary


def _print_scores(candidates: list[dict], best: dict) -> None:
    for c in candidates:
        mark = "  <- kept" if c is best else ""
        print(f"seed {c['seed']}: held-out loss {c['heldout_loss']:.4f}, {c['params']:,} parameters{mark}")


def _install_winner(out: str, folder: str, best: dict, candidates: list[dict], summary: dict) -> None:
    """Make OUT the winner's checkpoint with every search's record under OUT/restarts.

    Files are hard-linked into a staging folder (no copy of the weights), which then replaces OUT, so an
    interruption leaves either the searches or the finished folder, never half of both.
    """
    from .save import replace_run_folder

    for c in candidates:  # the losers' weights are no longer needed; the winner's live at the top
        if c is not best:
            for name in os.listdir(c["folder"]):
                if name.endswith(".safetensors"):
                    os.remove(os.path.join(c["folder"], name))
    winner_weights = shutil.ignore_patterns("*.safetensors")

    def fill(staging):
        shutil.copytree(best["folder"], staging, copy_function=_link_or_copy)
        shutil.copytree(folder, os.path.join(staging, RESTARTS_DIR), copy_function=_link_or_copy,
                        ignore=lambda d, names: winner_weights(d, names) if os.path.samefile(d, best["folder"]) else set())
        # new files, not writes into hard-linked ones (those would change the searches' records too)
        write_text_atomic(os.path.join(staging, "search_summary.json"), json.dumps(summary, indent=2))
        record = {"chosen_seed": best["seed"], "chosen_by": "lowest heldout_loss", "searches": summary["restarts"]}
        write_text_atomic(os.path.join(staging, RECORD_FILE), json.dumps(record, indent=2))

    replace_run_folder(out, fill)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _evaluate_and_push(cfg, out: str, source: str, summary: dict, state) -> None:
    from .loading import load_model_and_tokenizer, training_dtype
    from .search import _cached_eval, _evaluate_pruned, _report

    dtype = training_dtype(cfg.dtype)
    dense_eval = None
    if not cfg.no_eval:  # every rank takes part: _cached_eval synchronises them
        dense, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype)
        dense_eval = _cached_eval(os.path.join(out, RESTARTS_DIR, "dense_eval.json"), dense, tokenizer, cfg, state, source)
        del dense
        if state.is_main_process:
            pruned, tokenizer = load_model_and_tokenizer(out, dtype=dtype)
            summary["results"] = _evaluate_pruned(pruned, tokenizer, cfg, out, dense_eval)
    if cfg.push_to_hub and state.is_main_process:
        from .save import push_to_hub

        summary["hub_url"] = push_to_hub(out, cfg.push_to_hub, private=cfg.hub_private)
    if state.is_main_process:
        _report(summary, dense_eval)
