"""Perplexity under the two windowing protocols of the pruning papers, exactly:

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
   the log-softmax whatever the model's dtype, and the NLL is summed in fp64. Since every window has the
   same length this equals both the mean of the per-window means (LLM-Pruner) and SparseGPT's
   sum(mean * L) / (n * L).

Texts come from the Hub when reachable (`source="auto"`), else from the data folder (`data_dir`, else
$DMS_DATA_DIR); the result records which (file + sha256, or Hub id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..files import sha256_file
from ..hub import HUB_ERRORS, hub_reachable
# window_nll lives in passes (core): the search scores held-out blocks with it and sits below evaluation.
from ..passes import window_nll
from .tasks.utils import resolve_data_dir

logger = logging.getLogger(__name__)

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


def _want_hub(source: str) -> bool:
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', not {source!r}")
    return source == "hub" or (source == "auto" and hub_reachable())


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
        except HUB_ERRORS as e:  # in auto mode the Hub failing (not a bug of ours) falls back to the local copy
            if source == "hub":
                raise
            logger.warning("loading %s from the Hub failed (%s); using the local copy", dataset, e)
    path = resolve_data_dir(data_dir) / spec.local_file
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {path} for perplexity dataset {dataset!r}; pass a data folder that keeps the layout "
            f"of its README (--data-dir DIR, data_dir=..., or $DMS_DATA_DIR)."
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


# The benchmark evaluates many models of one tokenizer on the same text; tokenising WikiText-2 costs ~1 s.
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


def _model_dtype(model) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except (StopIteration, AttributeError):
        return "unknown"


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
