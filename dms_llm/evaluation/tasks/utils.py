"""Loaders for the local zero-shot tasks (`dms_*`), shared by the lm-eval CLI and dms_llm.evaluation.

Each task YAML in this folder names one `load_*` function as its `custom_dataset`. lm-eval calls it with
the task's metadata as keyword arguments, so the data folder is given as `data_dir` in the metadata
(`lm_eval ... --metadata '{"data_dir": "/abs/path"}'`, or `TaskManager(metadata={"data_dir": ...})`),
else by `$DMS_DATA_DIR`. The same rule finds the perplexity texts (dms_llm.evaluation.perplexity).

The loaders read the files in their original layouts (see the data folder's README) and return the
field names of the Hub datasets that lm-eval's stock tasks read, so that each YAML can keep the stock
task's prompt, choices, target and metrics unchanged. This module imports nothing from dms_llm: the
lm-eval CLI on a saved checkpoint needs only this folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DATA_DIR_ENV = "DMS_DATA_DIR"

# Files each task reads, relative to the data folder; dms_llm.evaluation hashes them into the results.
TASK_FILES = {
    "dms_boolq": ["boolq/dev.jsonl"],
    "dms_piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "dms_hellaswag": ["hellaswag/hellaswag_val_full.jsonl"],
    "dms_winogrande": ["winogrande/dev.jsonl"],
    "dms_arc_easy": ["arc/ARC-Easy-Test.jsonl"],
    "dms_arc_challenge": ["arc/ARC-Challenge-Test.jsonl"],
    "dms_openbookqa": ["openbookqa/test.jsonl"],
}


def data_dir_path(data_dir: str | os.PathLike | None = None, default: str | os.PathLike | None = None) -> Path:
    """The data folder by the one rule of dms_llm (calibration, perplexity, zero-shot, the commands): the
    argument, else $DMS_DATA_DIR, else `default` (the commands pass ../shared/data beside the repository;
    the library has no default). An absolute path, not checked to exist: see `resolve_data_dir`."""
    value = data_dir or os.environ.get(DATA_DIR_ENV) or default
    if not value:
        raise FileNotFoundError(
            f"no data folder given: pass the folder that holds boolq/, piqa/, wikitext-2-raw/, ... as --data-dir DIR "
            f"(dms-llm), data_dir=DIR (Python), --metadata '{{\"data_dir\": \"DIR\"}}' (lm_eval), or set {DATA_DIR_ENV}=DIR."
        )
    return Path(os.path.abspath(os.path.expanduser(value)))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder (`data_dir_path`), checked to exist, with its links resolved."""
    path = data_dir_path(data_dir)
    origin = "the data_dir argument" if data_dir else f"${DATA_DIR_ENV}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"evaluation data folder {path} (from {origin}) does not exist. Pass the folder that holds boolq/, piqa/, "
            f"wikitext-2-raw/, ...: --data-dir DIR (dms-llm), data_dir=DIR (Python), --metadata '{{\"data_dir\": \"DIR\"}}' "
            f"(lm_eval), or set {DATA_DIR_ENV}=DIR."
        )
    return path.resolve()


def data_file(data_dir: str | os.PathLike | None, relative: str) -> Path:
    path = resolve_data_dir(data_dir) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"missing evaluation file {path}. The data folder must keep the layout described in its "
            f"README ({relative}); pass another folder with --data-dir / data_dir / ${DATA_DIR_ENV}."
        )
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _as_dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _flat_choices(choices: list[dict]) -> dict:
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


# Each row-builder returns the Hub layout for one task; kept separate from the Dataset wrapping so that
# tests can compare rows directly.

def boolq_rows(data_dir=None) -> list[dict]:
    # SuperGLUE's BoolQ (what the stock task reads) has label 1 = yes = answer true.
    return [
        {"question": r["question"], "passage": r["passage"], "title": r.get("title", ""), "label": int(bool(r["answer"]))}
        for r in read_jsonl(data_file(data_dir, "boolq/dev.jsonl"))
    ]


def piqa_rows(data_dir=None) -> list[dict]:
    docs = read_jsonl(data_file(data_dir, "piqa/valid.jsonl"))
    labels = read_labels(data_file(data_dir, "piqa/valid-labels.lst"))
    if len(docs) != len(labels):
        raise ValueError(f"PIQA: {len(docs)} questions but {len(labels)} labels; the two files must align line by line")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def hellaswag_rows(data_dir=None) -> list[dict]:
    # The local file is already preprocessed (markers removed, activity label prefixed); only the
    # capitalisation of ctx_b that lm-eval applies cannot be restored, since ctx_a/ctx_b are merged.
    return [
        {"query": r["ctx"], "choices": list(r["endings"]), "label": int(r["label"])}
        for r in read_jsonl(data_file(data_dir, "hellaswag/hellaswag_val_full.jsonl"))
    ]


def winogrande_rows(data_dir=None) -> list[dict]:
    keys = ("qID", "sentence", "option1", "option2", "answer")
    return [{k: str(r[k]) for k in keys} for r in read_jsonl(data_file(data_dir, "winogrande/dev.jsonl"))]


def _arc_rows(data_dir, relative) -> list[dict]:
    return [
        {
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": _flat_choices(r["question"]["choices"]),
            "answerKey": r["answerKey"],
        }
        for r in read_jsonl(data_file(data_dir, relative))
    ]


def arc_easy_rows(data_dir=None) -> list[dict]:
    return _arc_rows(data_dir, "arc/ARC-Easy-Test.jsonl")


def arc_challenge_rows(data_dir=None) -> list[dict]:
    return _arc_rows(data_dir, "arc/ARC-Challenge-Test.jsonl")


def openbookqa_rows(data_dir=None) -> list[dict]:
    return [
        {
            "id": r["id"],
            "question_stem": r["question"]["stem"],
            "choices": _flat_choices(r["question"]["choices"]),
            "answerKey": r["answerKey"],
        }
        for r in read_jsonl(data_file(data_dir, "openbookqa/test.jsonl"))
    ]


# `custom_dataset` entry points. lm-eval passes every metadata key (version, config_source, the
# model_args of the CLI, ...), hence **_. The split names are those of the stock tasks, so `--limit N`
# selects the same first N documents.

def load_boolq(data_dir=None, **_):
    return _as_dataset("validation", boolq_rows(data_dir))


def load_piqa(data_dir=None, **_):
    return _as_dataset("validation", piqa_rows(data_dir))


def load_hellaswag(data_dir=None, **_):
    return _as_dataset("validation", hellaswag_rows(data_dir))


def load_winogrande(data_dir=None, **_):
    return _as_dataset("validation", winogrande_rows(data_dir))


def load_arc_easy(data_dir=None, **_):
    return _as_dataset("test", arc_easy_rows(data_dir))


def load_arc_challenge(data_dir=None, **_):
    return _as_dataset("test", arc_challenge_rows(data_dir))


def load_openbookqa(data_dir=None, **_):
    return _as_dataset("test", openbookqa_rows(data_dir))


# WinoGrande is scored by partial evaluation: the candidates differ in the context (the sentence up to
# the blank, with each option filled in) and share the continuation after the blank. lm-eval reads an
# int from doc_to_text as "the gold context among the choices".

def winogrande_gold_context(doc) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc) -> list[str]:
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc) -> str:
    cut = doc["sentence"].index("_")
    return doc["sentence"][cut + 1 :].strip()
