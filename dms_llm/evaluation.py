"""Perplexity (two windowing protocols) and lm-eval zero-shot accuracy, with results as JSON + Markdown.

Perplexity protocol, exactly:

1. The evaluation text of a dataset is built once (see `PPL_DATASETS`): WikiText-2 = the raw rows of the
   split joined with "\\n\\n"; PTB = the sentences of the split joined with "\\n\\n" (LLM-Pruner's join;
   SparseGPT joins PTB with " "); C4 = the first 1,100 documents joined with " " (SparseGPT's join).
2. It is tokenised in one call, `tokenizer(text)`: special tokens are whatever the tokenizer adds on its
   own (SmolLM2's adds none; a Llama-2 tokenizer adds one BOS at the very start, as in LLM-Pruner and
   SparseGPT). Nothing is added per window.
3. The ids are cut into consecutive non-overlapping windows of L tokens: L = 128 for `llm-pruner`,
   L = 2048 for `sparsegpt` (both capped at the model's `max_position_embeddings`). With T tokens there are
   floor(T / L) windows; the final T mod L tokens are dropped (neither scored nor used as context).
   `max_windows` keeps only the first windows (C4 keeps 256 by default, as SparseGPT does).
4. Each window is a separate forward pass with no memory of the previous one; it predicts its tokens
   1..L-1 from the tokens before them inside the window (L-1 predictions per window).
5. Perplexity = exp(mean NLL over all predictions of all windows); the logits are upcast to fp32 before
   the log-softmax whatever the model's dtype, and the NLL is summed in fp64. Since every window has the same length this equals both the mean of the
   per-window means (LLM-Pruner) and SparseGPT's sum(mean * L) / (n * L).

Zero-shot runs lm-eval's own task machinery on the in-memory model (`HFLM(pretrained=model)`), with the
local tasks in `eval/tasks/` (`dms_*`: the stock prompts and metrics, documents read from the data
folder) or, when the Hub is reachable and `source` allows it, lm-eval's stock tasks.
Accuracies are fractions in [0, 1] in the JSON; the Markdown shows percentages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASKS_DIR = REPO_ROOT / "eval" / "tasks"
DATA_DIR_ENV = "DMS_DATA_DIR"
TASKS_DIR_ENV = "DMS_TASKS_DIR"

# Window length per protocol, before the cap at the model's max_position_embeddings.
PROTOCOLS = {"llm-pruner": 128, "sparsegpt": 2048}

# Tokens per forward pass in perplexity; bounds the [batch, L, vocab] fp32 logits (8192 x 49152 x 4 B
# = 1.6 GB for SmolLM2) so that long-window protocols cannot exhaust memory with the default batch size.
PPL_MAX_TOKENS_PER_BATCH = 8192


@dataclass(frozen=True)
class PPLDataset:
    local_file: str  # relative to the data folder
    reader: str  # how the local file becomes Hub-style rows: "wikitext", "ptb" or "c4"
    join: str
    hub: dict  # datasets.load_dataset kwargs + the text field
    max_docs: int | None = None
    max_windows: int | None = None  # default cap on windows
    local_label: str | None = None  # results label when read locally, if the local file differs in kind

    def label(self, name: str, kind: str) -> str:
        return self.local_label if (kind == "local" and self.local_label) else name


_WIKITEXT_HUB = {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "field": "text"}
_PTB_HUB = {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank", "field": "sentence"}

PPL_DATASETS: dict[str, PPLDataset] = {
    "wikitext2": PPLDataset("wikitext-2-raw/wiki.test.raw", "wikitext", "\n\n", {**_WIKITEXT_HUB, "split": "test"}),
    "wikitext2-valid": PPLDataset(
        "wikitext-2-raw/wiki.valid.raw", "wikitext", "\n\n", {**_WIKITEXT_HUB, "split": "validation"}
    ),
    # PTB test; the DMS / LLM-Pruner papers report PTB on the validation split: `ptb-valid`.
    "ptb": PPLDataset("ptb/ptb.test.txt", "ptb", "\n\n", {**_PTB_HUB, "split": "test"}),
    "ptb-valid": PPLDataset("ptb/ptb.valid.txt", "ptb", "\n\n", {**_PTB_HUB, "split": "validation"}),
    # C4 validation from the Hub; offline the only local C4 is a *train* sample, labelled as such. rp2,
    # because the calibration data defaults to rp1.
    "c4": PPLDataset(
        "c4/sample_c4-rp2.jsonl",
        "c4",
        " ",
        {
            "path": "allenai/c4",
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "split": "validation",
            "field": "text",
        },
        max_docs=1100,
        max_windows=256,
        local_label="c4-train-sample",
    ),
}

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


# ----------------------------------------------------------------------------------------------------
# names and paths


def _split_names(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    names = [v.strip() for v in value if v and v.strip()]
    return [] if names in (["none"], ["None"]) else names


def check_ppl_datasets(names) -> list[str]:
    names = _split_names(names)
    if names == ["all"]:
        return list(PPL_DATASETS)
    unknown = [n for n in names if n not in PPL_DATASETS]
    if unknown:
        raise ValueError(f"unknown perplexity dataset(s) {unknown}; valid: {', '.join(PPL_DATASETS)} (or 'all')")
    return names


def check_protocols(names) -> list[str]:
    names = _split_names(names)
    if names == ["all"]:
        return list(PROTOCOLS)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown perplexity protocol(s) {unknown}; valid: {', '.join(PROTOCOLS)} (or 'all')")
    return names


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


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The evaluation data folder: the argument, else $DMS_DATA_DIR, else <repo>/../shared/data.
    Same rule as eval/tasks/utils.py (which must work without dms_llm, hence the two copies)."""
    if data_dir:
        path, origin = Path(data_dir).expanduser(), "--data-dir / data_dir"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        path, origin = REPO_ROOT.parent / "shared" / "data", "the default <repo>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"evaluation data folder {path} (from {origin}) does not exist. Pass the folder that holds "
            f"wikitext-2-raw/, ptb/, boolq/, ... with --data-dir DIR (data_dir= in Python) or set {DATA_DIR_ENV}=DIR."
        )
    return path.resolve()


def resolve_tasks_dir(tasks_dir: str | os.PathLike | None = None) -> Path:
    path = Path(tasks_dir or os.environ.get(TASKS_DIR_ENV) or DEFAULT_TASKS_DIR)
    if not (path / "utils.py").is_file():
        raise FileNotFoundError(
            f"local lm-eval task folder {path} not found (it ships in the repository as eval/tasks/, not in "
            f"the wheel); pass tasks_dir= or set {TASKS_DIR_ENV}."
        )
    return path.resolve()


def _task_utils(tasks_dir: Path):
    spec = importlib.util.spec_from_file_location("dms_eval_task_utils", tasks_dir / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when the HF offline switches are set, else whether huggingface.co answers a TCP connect."""
    global _HUB_REACHABLE
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    if _HUB_REACHABLE is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def _want_hub(source: str) -> bool:
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', not {source!r}")
    return source == "hub" or (source == "auto" and hub_reachable())


# ----------------------------------------------------------------------------------------------------
# perplexity text


def _lines_with_ends(text: str) -> list[str]:
    # str.splitlines would also split on \x0b, \x1c, \u2028 ... which occur inside WikiText lines.
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def wikitext_rows(path: str | os.PathLike) -> list[str]:
    """The Hub rows of a raw WikiText file: line i with its newline, space-only lines as ""."""
    text = Path(path).read_text(encoding="utf-8")
    return ["" if not line.strip(" \n") else line for line in _lines_with_ends(text)]


def ptb_rows(path: str | os.PathLike) -> list[str]:
    """The Hub `ptb_text_only` rows: each line stripped of surrounding whitespace."""
    return [line.strip() for line in _lines_with_ends(Path(path).read_text(encoding="utf-8"))]


def c4_rows(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


_READERS = {"wikitext": wikitext_rows, "ptb": ptb_rows, "c4": c4_rows}


def load_ppl_text(dataset: str, data_dir=None, source: str = "auto") -> tuple[str, dict]:
    """(text, source record) for a perplexity dataset; the record says where the text came from."""
    (dataset,) = check_ppl_datasets([dataset])
    spec = PPL_DATASETS[dataset]
    if _want_hub(source):
        hub = dict(spec.hub)
        field = hub.pop("field")
        try:
            import datasets

            ds = datasets.load_dataset(**hub)
            if spec.max_docs:
                ds = ds.select(range(min(spec.max_docs, len(ds))))
            rows = list(ds[field])
            record = {"kind": "hub", "label": dataset, "dataset": hub["path"], "config": hub.get("name"),
                      "data_files": hub.get("data_files"), "split": hub["split"], "rows": len(rows),
                      "fingerprint": getattr(ds, "_fingerprint", None), "join": spec.join}
            return spec.join.join(rows), record
        except Exception as e:  # noqa: BLE001 - any Hub failure falls back to the local copy in auto mode
            if source == "hub":
                raise
            logger.warning("loading %s from the Hub failed (%s); using the local copy", dataset, e)
    path = resolve_data_dir(data_dir) / spec.local_file
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {path} for perplexity dataset {dataset!r}; pass a data folder that keeps the layout "
            f"of its README (--data-dir DIR, data_dir=..., or ${DATA_DIR_ENV})."
        )
    rows = _READERS[spec.reader](path)
    if spec.max_docs:
        rows = rows[: spec.max_docs]
    record = {
        "kind": "local",
        "label": spec.label(dataset, "local"),
        "path": str(path),
        "sha256": sha256_file(path),
        "rows": len(rows),
        "join": spec.join,
    }
    if spec.local_label:
        record["note"] = f"{spec.local_label}: C4 train documents, not the C4 validation split"
    return spec.join.join(rows), record


# The search evaluates the same text many times with one tokenizer; tokenising WikiText-2 costs ~1 s.
_TOKEN_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    key = hashlib.sha1(text.encode("utf-8")).hexdigest()
    try:
        cache = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # an unhashable tokenizer: no cache
        cache = {}
    if key not in cache:
        # verbose=False: the "longer than the model's max length" warning is expected, we window later.
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
        cache[key] = torch.tensor(ids, dtype=torch.long)
    return cache[key]


# ----------------------------------------------------------------------------------------------------
# perplexity


def protocol_seq_len(protocol: str, model=None) -> int:
    (protocol,) = check_protocols([protocol])
    seq_len = PROTOCOLS[protocol]
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(seq_len, max_pos) if max_pos else seq_len


def make_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> tuple[torch.Tensor, dict]:
    """Non-overlapping windows of exactly seq_len tokens; the tail shorter than seq_len is dropped."""
    ids = ids.reshape(-1)
    available = ids.numel() // seq_len
    n = available if max_windows is None else min(available, int(max_windows))
    if n < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    info = {
        "seq_len": seq_len,
        "n_tokens": ids.numel(),
        "n_windows_available": available,
        "n_windows": n,
        "n_tokens_tail_dropped": ids.numel() - available * seq_len,
        "n_tokens_unscored": ids.numel() - n * seq_len,
        "n_predicted": n * (seq_len - 1),
    }
    return windows, info


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _model_dtype(model) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except (StopIteration, AttributeError):
        return "unknown"


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True, desc: str = "ppl") -> tuple[float, int]:
    """(sum of NLL in nats, number of predicted tokens) over the windows, each window on its own."""
    from tqdm.auto import tqdm

    device = _model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        starts = range(0, windows.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # fp32 log-softmax whatever the model dtype: bf16 logits lose ~2 digits in the loss.
            logits = logits[:, :-1, :].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            # fp64 sum: an fp32 sum over ~300k tokens drifts in the 6th digit.
            total += nll.double().sum().cpu()
            count += targets.numel()
    finally:
        model.train(was_training)
    return total.item(), count


def perplexity_of_ids(model, ids: torch.Tensor, seq_len: int, batch_size: int | None = None, max_windows: int | None = None,
                      progress: bool = True, desc: str = "ppl") -> dict:
    """Perplexity of a token stream under the windowing rule of this module (see the module docstring)."""
    windows, info = make_windows(ids, seq_len, max_windows)
    cap = max(1, PPL_MAX_TOKENS_PER_BATCH // seq_len)
    batch_size = min(batch_size or cap, cap)
    nll_sum, count = window_nll(model, windows, batch_size=batch_size, progress=progress, desc=desc)
    assert count == info["n_predicted"]
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll_mean": mean, "batch_size": batch_size, **info}


def perplexity(model, tokenizer, dataset: str = "wikitext2", protocol: str = "llm-pruner", data_dir=None,
               batch_size: int | None = 8, max_windows: int | None = None, source: str = "auto",
               progress: bool = True) -> dict:
    """Perplexity of `model` on one dataset under one protocol. Returns a dict with `ppl`, the window
    counts, how many tokens were dropped, and `source` (file + sha256, or Hub id)."""
    t0 = time.perf_counter()
    (dataset,) = check_ppl_datasets([dataset])
    seq_len = protocol_seq_len(protocol, model)
    text, record = load_ppl_text(dataset, data_dir=data_dir, source=source)
    ids = tokenize_text(tokenizer, text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if max_windows is None:
        max_windows = PPL_DATASETS[dataset].max_windows
    out = perplexity_of_ids(model, ids, seq_len, batch_size=batch_size, max_windows=max_windows, progress=progress,
                            desc=f"ppl {record['label']} {protocol}")
    out.update(
        dataset=dataset,
        label=record["label"],
        protocol=protocol,
        max_windows=max_windows,
        bos_prepended=bool(bos is not None and ids.numel() and int(ids[0]) == bos),
        dtype=_model_dtype(model),
        source=record,
        time_s=round(time.perf_counter() - t0, 2),
    )
    return out


# ----------------------------------------------------------------------------------------------------
# zero-shot


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
              seed: int = 0, source: str = "auto", tasks_dir=None,
              on_task_done: Callable[[str, dict, dict, float], None] | None = None) -> dict:
    """Runs lm-eval on the in-memory model, one task at a time (for per-task timing). Returns
    {"zero_shot": {task: metrics}, "sources": {task: record}, "time_s": {task: seconds}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(tasks)
    out: dict[str, dict] = {"zero_shot": {}, "sources": {}, "time_s": {}}
    if not tasks:
        return out
    _quiet_lm_eval()
    use_hub = _want_hub(source)
    managers: dict[str, Any] = {}

    def manager(kind: str):
        # Built lazily: the local one needs the data folder, the stock one indexes ~15k tasks (9 s).
        if kind not in managers:
            if kind == "hub":
                managers[kind] = TaskManager(include_defaults=True)
            else:
                tdir = resolve_tasks_dir(tasks_dir)
                ddir = resolve_data_dir(data_dir)
                managers["utils"] = _task_utils(tdir)
                managers["data_dir"] = ddir
                managers[kind] = TaskManager(include_path=str(tdir), include_defaults=False,
                                             metadata={"data_dir": str(ddir)})
        return managers[kind]

    def run(kind: str, name: str) -> tuple[dict, dict]:
        tm = manager(kind)
        if kind == "hub":
            record = {"kind": "hub", "task": name}
        else:
            utils, ddir = managers["utils"], managers["data_dir"]
            paths = [utils.data_file(ddir, rel) for rel in utils.TASK_FILES[name]]
            record = {"kind": "local", "task": name, "files": [{"path": str(p), "sha256": sha256_file(p)} for p in paths]}
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=tm, limit=limit, num_fewshot=0, log_samples=False,
            bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        return res, record

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for key in tasks:
            local_name, stock_name, reported = ZERO_SHOT_TASKS[key]
            t0 = time.perf_counter()
            if use_hub:
                try:
                    name = stock_name
                    res, record = run("hub", name)
                except Exception as e:  # noqa: BLE001 - in auto mode any Hub failure falls back to local
                    if source == "hub":
                        raise
                    logger.warning("stock task %s failed (%s); using the local %s", stock_name, e, local_name)
                    name = local_name
                    res, record = run("local", name)
            else:
                name = local_name
                res, record = run("local", name)
            elapsed = round(time.perf_counter() - t0, 2)
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
            out["zero_shot"][key] = metrics
            out["sources"][key] = record
            out["time_s"][key] = elapsed
            logger.info("%s %s = %s (%s docs, %.1f s)", key, reported, metrics["value"], metrics["n"], elapsed)
            if on_task_done:
                on_task_done(key, metrics, record, elapsed)
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------
# everything together


def count_params(model) -> int:
    # parameters() yields a tied embedding once, which is the count the budget and the papers use.
    return int(sum(p.numel() for p in model.parameters()))


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def evaluate_model(model, tokenizer, ppl: Sequence[str] | str = ("wikitext2",), protocols: Sequence[str] | str = ("llm-pruner",),
                   tasks: Sequence[str] | str = (), data_dir=None, limit: int | float | None = None,
                   batch_size: int = 8, max_windows: int | None = None, seed: int = 0, source: str = "auto",
                   model_name: str | None = None, tasks_dir=None, progress: bool = True,
                   on_part_done: Callable[[dict], None] | None = None) -> dict:
    """Perplexity on every (dataset, protocol) and zero-shot on every task; returns the results dict
    (`write_results` stores it). `on_part_done(results)` is called after each part, for checkpointing."""
    import lm_eval

    ppl, protocols, tasks = check_ppl_datasets(ppl), check_protocols(protocols), check_tasks(tasks)
    if ppl and not protocols:
        raise ValueError("perplexity datasets given but no protocol")
    t_start = time.perf_counter()
    _set_seed(seed)
    name = model_name or getattr(model, "name_or_path", None) or "<in-memory model>"
    results: dict[str, Any] = {
        "format": "dms_eval/1",
        "model": str(name),
        "params": count_params(model),
        "dtype": _model_dtype(model),
        "device": str(_model_device(model)),
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
              source=source, tasks_dir=tasks_dir, on_task_done=task_done)
    results["time_s"]["total"] = round(time.perf_counter() - t_start, 2)
    return results


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------------
# output


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

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(cells(r)) + " |")
        if i > 0:
            lines.append("| " + " | ".join(diff(r, rows[0])) + " |")
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
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [results["baseline"], results] if results.get("baseline") else [results]
    for path, content in ((json_path, json.dumps(results, indent=2, default=str) + "\n"), (md_path, results_markdown(rows))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
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
