"""Zero-shot accuracy with lm-evaluation-harness's own task machinery on the in-memory model
(`HFLM(pretrained=model)`): the local tasks that ship in `tasks/` (`dms_*`: the stock prompts and metrics,
documents read from the data folder) or, when the Hub is reachable and `source` allows it, lm-eval's
stock tasks. Accuracies are fractions in [0, 1]."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from ..files import sha256_file
from ..hub import HUB_ERRORS
from .perplexity import _split_names, _want_hub
from .tasks import utils as task_utils

logger = logging.getLogger(__name__)

TASKS_DIR = Path(task_utils.__file__).resolve().parent

# name -> (local task, stock lm-eval task, reported metric). The reported metric follows the usual
# convention of the pruning papers (LLM-Pruner, FLAP, DMS): acc_norm where lm-eval's acc is length-biased.
ZERO_SHOT_TASKS: dict[str, tuple[str, str, str]] = {
    "boolq": ("dms_boolq", "boolq", "acc"),
    "piqa": ("dms_piqa", "piqa", "acc"),
    "hellaswag": ("dms_hellaswag", "hellaswag", "acc_norm"),
    "winogrande": ("dms_winogrande", "winogrande", "acc"),
    "arc_easy": ("dms_arc_easy", "arc_easy", "acc"),
    "arc_challenge": ("dms_arc_challenge", "arc_challenge", "acc_norm"),
    "openbookqa": ("dms_openbookqa", "openbookqa", "acc_norm"),
}

def check_tasks(names) -> list[str]:
    """Task names as the user writes them (`boolq`); `dms_boolq` and stock names map to the same key."""
    names = _split_names(names)
    if names == ["all"]:
        return list(ZERO_SHOT_TASKS)
    aliases = {alias: key for key, (local, stock, _) in ZERO_SHOT_TASKS.items() for alias in (key, local, stock)}
    unknown = [n for n in names if n not in aliases]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; valid: {', '.join(ZERO_SHOT_TASKS)} (or 'all')")
    out: list[str] = []
    for n in names:
        if aliases[n] not in out:
            out.append(aliases[n])
    return out


class _DropCustomKwargsNotice(logging.Filter):
    # lm-eval warns on every task with a custom_dataset that kwargs can be passed via --metadata; it is
    # exactly how we pass the data folder, so the notice is noise here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_lm_eval():
    filt = _DropCustomKwargsNotice()
    for name in ("lm-eval", "lm_eval", "lm_eval.api.task"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropCustomKwargsNotice) for f in lg.filters):
            lg.addFilter(filt)


def _metric(task_result: dict, name: str):
    value = task_result.get(f"{name},none")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def zero_shot(model, tokenizer, tasks, data_dir=None, limit: int | float | None = None, batch_size: int = 8,
              seed: int = 0, source: str = "auto",
              on_task_done: Callable[[str, dict, dict, float], None] | None = None) -> dict:
    """Runs lm-eval on the in-memory model, one task at a time (for per-task timing). Returns
    {"zero_shot": {task: metrics}, "sources": {task: record}, "time_s": {task: seconds}}."""
    from lm_eval.models.huggingface import HFLM

    tasks = check_tasks(tasks)
    out: dict[str, dict] = {"zero_shot": {}, "sources": {}, "time_s": {}}
    if not tasks:
        return out
    _quiet_lm_eval()
    use_hub = _want_hub(source)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")
    runner = _TaskRunner(lm, data_dir, limit, seed)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for key in tasks:
            local_name, stock_name, reported = ZERO_SHOT_TASKS[key]
            t0 = time.perf_counter()
            if use_hub:
                try:
                    name = stock_name
                    res, record = runner.run("hub", name)
                except HUB_ERRORS as e:  # in auto mode the Hub failing (not a bug of ours) falls back to local
                    if source == "hub":
                        raise
                    logger.warning("stock task %s failed (%s); using the local %s", stock_name, e, local_name)
                    name = local_name
                    res, record = runner.run("local", name)
            else:
                name = local_name
                res, record = runner.run("local", name)
            elapsed = round(time.perf_counter() - t0, 2)
            metrics = _task_metrics(res, name, reported)
            out["zero_shot"][key] = metrics
            out["sources"][key] = record
            out["time_s"][key] = elapsed
            logger.info("%s %s = %s (%s docs, %.1f s)", key, reported, metrics["value"], metrics["n"], elapsed)
            if on_task_done:
                on_task_done(key, metrics, record, elapsed)
    finally:
        model.train(was_training)
    return out


class _TaskRunner:
    """One lm-eval task at a time on one model (`lm`), from the stock task index ("hub") or the local task
    YAMLs over the data folder ("local"), each run recording where its data came from."""

    def __init__(self, lm, data_dir, limit, seed: int):
        self.lm, self.data_dir, self.limit, self.seed = lm, data_dir, limit, seed
        self.managers: dict[str, Any] = {}

    def manager(self, kind: str):
        from lm_eval.tasks import TaskManager

        # Built lazily: the local one needs the data folder, the stock one indexes ~15k tasks (9 s).
        if kind not in self.managers:
            if kind == "hub":
                self.managers[kind] = TaskManager(include_defaults=True)
            else:
                ddir = task_utils.resolve_data_dir(self.data_dir)
                self.managers["data_dir"] = ddir
                self.managers[kind] = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                                  metadata={"data_dir": str(ddir)})
        return self.managers[kind]

    def run(self, kind: str, name: str) -> tuple[dict, dict]:
        """(lm-eval's results, the record of the task's source: the Hub task, or the local files and hashes)."""
        import lm_eval

        tm = self.manager(kind)
        if kind == "hub":
            record = {"kind": "hub", "task": name}
        else:
            ddir = self.managers["data_dir"]
            paths = [task_utils.data_file(ddir, rel) for rel in task_utils.TASK_FILES[name]]
            record = {"kind": "local", "task": name, "files": [{"path": str(p), "sha256": sha256_file(p)} for p in paths]}
        seed = self.seed
        res = lm_eval.simple_evaluate(
            model=self.lm, tasks=[name], task_manager=tm, limit=self.limit, num_fewshot=0, log_samples=False,
            bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        return res, record


def _task_metrics(res: dict, name: str, reported: str) -> dict:
    """acc / acc_norm with their stderr, the metric the table reports (`value`) and the documents scored."""
    task_result = res["results"][name]
    metrics: dict[str, Any] = {}
    for m in ("acc", "acc_norm"):
        if _metric(task_result, m) is not None:
            metrics[m] = _metric(task_result, m)
            metrics[f"{m}_stderr"] = _metric(task_result, f"{m}_stderr")
    metrics["reported_metric"] = reported
    metrics["value"] = metrics.get(reported)
    n = res.get("n-samples", {}).get(name, {})
    metrics["n"] = n.get("effective")
    metrics["n_total"] = n.get("original")
    return metrics
