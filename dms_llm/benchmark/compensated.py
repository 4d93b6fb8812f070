"""The `BASELINE+compensation` rows of the benchmark: what the DMS recipe gives its own plan, given to a
baseline's. The baseline's plan is computed on the DMS search's calibration blocks (or on the authors'
larger default, `AUTHORS_CALIBRATION_TOKENS`, where that is more), then o_proj/down_proj are refit as the
recipe refits its plans, on the first of those blocks. Beside the DMS rows, they separate what a search's
allocation is worth from what the refit adds."""

from __future__ import annotations

import os
import time

from ..baselines import AUTHORS_CALIBRATION_TOKENS, METHODS
from ..errors import ActionableError

COMPENSATION = "+compensation"
COMPENSATED = tuple(name + COMPENSATION for name in METHODS)


def refit_settings(dms_recipe: dict | None) -> list:
    """[blocks, alpha] of the DMS recipe's refit."""
    from ..refit import DEFAULT_ALPHA, DEFAULT_BLOCKS

    if dms_recipe is None:
        raise ActionableError("the +compensation rows take the DMS recipe's calibration and refit: give --dms-config")
    return [int(dms_recipe.get("refit_samples") or DEFAULT_BLOCKS), float(dms_recipe.get("refit_alpha") or DEFAULT_ALPHA)]


def compensation_calibration(bench, base: str, budget: float) -> list:
    """[dataset, blocks, seq_len, seed] the compensated `base` calibrates on at `budget`: the blocks of that
    budget's DMS search, or as many as the authors' default needs when that is more."""
    recipe, a = bench.recipe(budget), bench.args
    refit_settings(recipe)  # the recipe is needed
    seq_len, blocks = int(recipe.get("seq_len") or a.seq_len), int(recipe.get("num_samples") or a.calib_samples)
    authors = AUTHORS_CALIBRATION_TOKENS.get(base, 0)
    return [recipe.get("dataset") or a.calib_dataset, max(blocks, -(-authors // seq_len)), seq_len, a.seed]


def build_compensated(bench, row: dict) -> None:
    """The baseline's plan, pruned, refit, saved as a checkpoint folder under the work folder (its artifact)."""
    from ..checkpoints import save_pruned
    from ..data import load_calibration
    from ..prune import prune_model
    from ..refit import refit_output_projections

    a, base = bench.args, row["method"][: -len(COMPENSATION)]
    dataset, n_blocks, seq_len, seed = compensation_calibration(bench, base, row["budget"])
    refit_blocks, alpha = refit_settings(bench.recipe(row["budget"]))
    dense = bench.dense()
    blocks = load_calibration(dataset, bench.tokenizer(), seq_len, n_blocks, seed=seed, data_dir=a.data_dir)
    print(f"[benchmark] {row['method']} at {row['budget']:g}: {base}'s plan on {blocks.numel():,} tokens, "
          f"then the refit on {min(refit_blocks, len(blocks))} blocks", flush=True)
    start = time.perf_counter()
    plan = METHODS[base](dense, blocks, bench.target(row["budget"]), source_model=a.model, align=a.align)
    pruned = prune_model(dense, plan)
    plan.metadata.refit = refit_output_projections(pruned, dense, plan, blocks[:refit_blocks], alpha=alpha,
                                                   batch_size=a.batch_size, progress=True)
    seconds = time.perf_counter() - start
    plan.metadata.time_s = seconds
    folder = os.path.join(a.work, "compensated", row["name"])
    save_pruned(pruned, bench.tokenizer(), folder, plan, overwrite=True, source_dir=a.model if os.path.isdir(a.model) else None)
    row.update(params=plan.params_after, time_s=seconds, artifact=os.path.relpath(folder, a.work),
               info={k: v for k, v in plan.metadata.to_dict().items() if k not in ("block_influence",)})
