"""Evaluation: perplexity (two windowing protocols), lm-eval zero-shot on the in-memory model with task
files that ship in this package (`tasks/`), results as JSON + Markdown, and prefill/decode timing."""

from .perplexity import (
    PPL_DATASETS, PROTOCOLS, check_ppl_datasets, check_protocols, hub_reachable, load_ppl_text, make_windows,
    perplexity, perplexity_of_ids, resolve_data_dir, wikitext_rows, window_nll,
)
from .results import check_output, evaluate_model, ppl_change_lines, results_markdown, write_results
from .zero_shot import TASKS_DIR, ZERO_SHOT_TASKS, check_tasks, zero_shot

__all__ = [
    "PPL_DATASETS", "PROTOCOLS", "TASKS_DIR", "ZERO_SHOT_TASKS", "check_output", "check_ppl_datasets", "check_protocols",
    "check_tasks", "evaluate_model", "hub_reachable", "load_ppl_text", "make_windows", "perplexity", "perplexity_of_ids",
    "ppl_change_lines", "resolve_data_dir", "results_markdown", "wikitext_rows", "window_nll", "write_results", "zero_shot",
]
