"""Best of several searches (`dms-llm search --restarts N`): one short search follows a noisy gradient (a
batch of a few blocks per step), so searches that differ only in their seed reach architectures whose
test perplexities differ by tens of percent. Running N of them on the same calibration blocks and
keeping the one with the lowest loss on held-out calibration blocks (never an evaluation split) costs N
searches and removes most of that luck. With --refit the searches are still ranked by the plain
slice's loss, the architecture the search found: ranked after the refit, the 50% SmolLM2 searches would
have kept a worse one on validation text (docs/RESULTS.md section 12).

Each search is an ordinary run in OUT/restarts/seed-S (so each one checkpoints and resumes on its own);
this module keeps the best of the finished ones: the winner's checkpoint becomes OUT, the others keep
their plan, summary and metrics but not their weights.
"""

from __future__ import annotations

import json
import os
import shutil

from ..files import replace_folder, write_json_atomic

RESTARTS_DIR = "restarts"
RECORD_FILE = "restarts.json"


def restarts_of(folder: str) -> int | None:
    """How many searches a finished `dms-llm search --restarts` run compared (None: not a restarts run)."""
    path = os.path.join(folder, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return len(json.load(f)["searches"])


def keep_best(out: str, candidates: list[dict]) -> dict:
    """Install the search with the lowest held-out loss as OUT (main process); returns OUT's summary.
    `candidates`: each finished search's summary with its `seed` and `folder`."""
    best = min(candidates, key=lambda c: c["heldout_loss"])
    summary = {k: v for k, v in best.items() if k not in ("seed", "folder")}
    summary.update(output_dir=out, search_time_s=sum(c["search_time_s"] for c in candidates), chosen_seed=best["seed"],
                   restarts=[{k: c[k] for k in ("seed", "heldout_loss", "heldout_loss_after_refit", "params", "search_time_s")
                               if k in c} for c in candidates])
    for c in candidates:
        mark = "  <- kept" if c is best else ""
        print(f"seed {c['seed']}: held-out loss {c['heldout_loss']:.4f}, {c['params']:,} parameters{mark}")
    _install_winner(out, best, candidates, summary)
    return summary


def _install_winner(out: str, best: dict, candidates: list[dict], summary: dict) -> None:
    """Make OUT the winner's checkpoint with every search's record under OUT/restarts.

    Files are hard-linked into a staging folder (no copy of the weights), which then replaces OUT, so an
    interruption leaves either the searches or the finished folder, never half of both.
    """
    for c in candidates:  # the losers' weights are no longer needed; the winner's live at the top
        if c is not best:
            for name in os.listdir(c["folder"]):
                if name.endswith(".safetensors"):
                    os.remove(os.path.join(c["folder"], name))
    winner_weights = shutil.ignore_patterns("*.safetensors")
    folder = os.path.join(out, RESTARTS_DIR)

    def fill(staging):
        shutil.copytree(best["folder"], staging, copy_function=_link_or_copy)
        shutil.copytree(folder, os.path.join(staging, RESTARTS_DIR), copy_function=_link_or_copy,
                        ignore=lambda d, names: winner_weights(d, names) if os.path.samefile(d, best["folder"]) else set())
        # new files, not writes into hard-linked ones (those would change the searches' records too)
        write_json_atomic(os.path.join(staging, "search_summary.json"), summary)
        record = {"chosen_seed": best["seed"], "chosen_by": "lowest heldout_loss", "searches": summary["restarts"]}
        write_json_atomic(os.path.join(staging, RECORD_FILE), record)

    replace_folder(out, fill)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)
