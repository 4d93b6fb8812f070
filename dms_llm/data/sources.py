"""Where calibration text comes from: named datasets (the offline C4 train sample, WikiText-2, PTB, C4,
Alpaca), local .txt/.jsonl/.json/.parquet files (optionally .gz) or folders of them, and Hub datasets.

A source yields units `(text, starts_new_document)`; a whole text file is one document, cut into
pieces at line ends so that the tokenizer gets a batch. Only training splits are used: files whose names
mark an evaluation split (test, valid, dev, ...) are refused, and skipped inside folders, so that
calibration can never see the data a model is scored on.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..evaluation.tasks.utils import data_dir_path
from ..hub import hub_host_resolves, offline_mode

logger = logging.getLogger(__name__)

DEFAULT_C4_SAMPLE = os.path.join("c4", "sample_c4-rp1.jsonl")
C4_SAMPLES = (DEFAULT_C4_SAMPLE, os.path.join("c4", "sample_c4-rp2.jsonl"))  # both: for runs that read more than one holds
WIKITEXT2_TOKENS_TRAIN = os.path.join("wikitext-2-tokens", "wiki.train.tokens")
PTB_TRAIN = os.path.join("ptb", "ptb.train.txt")
C4_HUB_SHARD = "en/c4-train.00000-of-01024.json.gz"
NAMED_DATASETS = ("default", "c4-sample", "c4-samples", "wikitext2", "ptb", "c4", "alpaca")
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".tokens", ".raw")
# A whole text is cut into pieces of about this many characters, at line ends, so that the Rust
# tokenizer gets a batch: on this CPU 4 KB pieces tokenise 2-3x faster than 64 KB ones or one 10 MB
# string, with identical tokens at these line ends (checked on PTB and WikiText-2).
_TEXT_PIECE_CHARS = 1 << 12
_BATCH = 256
# Hub C4 shard 0 is 356k documents; tokenise only its first documents, this many times the tokens asked.
_LARGE_SOURCE_TOKEN_MARGIN = 4
_EVAL_SPLIT_WORDS = {"test", "tests", "valid", "validation", "val", "dev", "eval", "evaluation", "heldout"}

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n{output}"

# A unit is (text, starts_new_document); pieces of one whole text continue the same document.
Units = Iterator[tuple[str, bool]]


@dataclass
class _Source:
    name: str  # what the caller asked for
    kind: str  # "local" or "hub"
    location: str  # folder/file path, or the Hub id with its config
    split: str
    units: Callable[[], Units]
    identity: list  # enters the cache key: what makes the text change
    files: list[str] = field(default_factory=list)
    text_field: str | None = None
    note: str = ""
    large: bool = False


def _data_file(data_dir: str | None, rel: str, what: str) -> str:
    path = os.path.join(data_dir_path(data_dir), rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} needs the offline file {path}, which does not exist. Pass data_dir=... (or set "
            f"DMS_DATA_DIR) to the folder that holds {rel}, or pass a path to your own calibration file."
        )
    return path


def looks_like_eval_split(path: str) -> bool:
    """True for file names such as `wiki.test.raw`, `ptb.valid.txt`, `dev.jsonl`, `hellaswag_val.jsonl`."""
    base = os.path.basename(path).lower()
    words = re.split(r"[._\-\s]+", base)
    return any(w in _EVAL_SPLIT_WORDS for w in words)


def _suffix(path: str) -> str:
    p = path.lower()
    if p.endswith(".gz"):
        p = p[:-3]
    return os.path.splitext(p)[1]


def _open_text(path: str):
    opener = gzip.open if path.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _read_text(path: str) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); calibration files must be UTF-8") from None


def _text_pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + _TEXT_PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _field_of(record, path: str, text_field: str, where: str):
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        raise KeyError(
            f"{path}{where} has no field {text_field!r}; its fields are {sorted(record)}. "
            f"Pass text_field=... to choose one."
        )
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}{where}: field {text_field!r} holds {type(value).__name__}, not text")
    return value


def _json_records(path: str, text_field: str) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".json":
        with _open_text(path) as f:
            raw = f.read()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = None  # more than one value: JSON Lines under a .json name
        if data is not None:
            if isinstance(data, dict):
                if isinstance(data.get(text_field), list):  # column layout {"text": [...]}
                    data = [{text_field: v} for v in data[text_field]]
                else:  # {"data": [...]}-style wrapper with one list of records
                    lists = [v for v in data.values() if isinstance(v, list)]
                    if len(lists) != 1:
                        raise ValueError(
                            f"{path}: expected a list of records, a JSON Lines file, or an object with "
                            f"one list of records; found an object with keys {sorted(data)[:10]}"
                        )
                    data = lists[0]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
            for i, record in enumerate(data):
                value = _field_of(record, path, text_field, f" record {i}")
                if value:
                    yield value
            return
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not valid JSON ({e})") from None
            value = _field_of(record, path, text_field, f" line {lineno}")
            if value:
                yield value


def _parquet_records(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise KeyError(
            f"{path} has no column {text_field!r}; its columns are {names}. Pass text_field=... to choose one."
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}: column {text_field!r} holds {type(value).__name__}, not text")
            if value:
                yield value


def _file_units(path: str, text_field: str) -> Units:
    suffix = _suffix(path)
    if suffix in (".jsonl", ".json"):
        for doc in _json_records(path, text_field):
            yield doc, True
    elif suffix == ".parquet":
        for doc in _parquet_records(path, text_field):
            yield doc, True
    else:  # a plain text file is one document
        first = True
        for piece in _text_pieces(_read_text(path)):
            yield piece, first
            first = False


def _local_source(name: str, path: str, text_field: str, split: str = "train", note: str = "") -> _Source:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        files, skipped = [], []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if n.startswith(".") or _suffix(n) not in SUPPORTED_SUFFIXES:
                    continue
                (skipped if looks_like_eval_split(n) else files).append(os.path.join(root, n))
        if skipped:
            logger.warning(
                "calibration folder %s: skipping %d file(s) named like evaluation splits: %s",
                path, len(skipped), ", ".join(os.path.relpath(s, path) for s in skipped),
            )
        if not files:
            raise ValueError(
                f"calibration folder {path} holds no usable file (supported: {', '.join(SUPPORTED_SUFFIXES)}, "
                f"optionally .gz; files named like test/valid/dev splits are never used)"
            )
    elif os.path.isfile(path):
        if _suffix(path) not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"unsupported calibration file {path}: use one of {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz), "
                f"or a folder of such files"
            )
        if looks_like_eval_split(path):
            raise ValueError(
                f"refusing to calibrate on {path}: its name marks an evaluation split (test/valid/dev). "
                f"Calibrate on training data (e.g. the C4 train sample, the default); if this file really is "
                f"training data, rename it."
            )
        files = [path]
    else:
        raise FileNotFoundError(
            f"calibration data {path} does not exist. Pass one of {', '.join(NAMED_DATASETS)}, or an existing "
            f".txt/.jsonl/.json/.parquet file or folder."
        )

    def units() -> Units:
        for f in files:  # each file's first unit starts a document, so files are separated by EOS
            yield from _file_units(f, text_field)

    identity = []
    for f in files:
        st = os.stat(f)
        identity.append([f, st.st_size, st.st_mtime_ns])
    uses_field = any(_suffix(f) in (".jsonl", ".json", ".parquet") for f in files)
    return _Source(
        name=name,
        kind="local",
        location=path,
        split=split,
        units=units,
        identity=identity,
        files=files,
        text_field=text_field if uses_field else None,
        note=note,
    )


def _try_hub(path: str, config: str | None = None, split: str = "train", **kwargs):
    """The Hub dataset, or None when the Hub cannot be reached and it is not in the datasets cache.

    With HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, `datasets` answers from its cache or fails at once;
    without them, a machine whose DNS cannot resolve the Hub is skipped rather than retried for ~25 s."""
    if not offline_mode() and not hub_host_resolves():
        logger.info("Hugging Face Hub not reachable (DNS); not trying %s", path)
        return None
    from datasets import load_dataset

    try:
        return load_dataset(path, config, split=split, **kwargs)
    except (ConnectionError, OSError) as e:
        logger.info("could not load %s from the Hub: %s", path, str(e).splitlines()[0][:200])
        return None


def _hub_source(
    name: str, ds, location: str, to_units: Callable[[object], Units], note: str = "", large: bool = False
) -> _Source:
    fingerprint = getattr(ds, "_fingerprint", None)
    return _Source(
        name=name,
        kind="hub",
        location=location,
        split="train",
        units=lambda: to_units(ds),
        identity=[location, "train", fingerprint, len(ds)],
        note=note,
        large=large,
    )


def _joined_text_units(rows: Iterable[str], sep: str) -> Units:
    first = True
    for piece in _text_pieces(sep.join(r for r in rows if r is not None)):
        yield piece, first
        first = False


def _alpaca_units(ds) -> Units:
    for row in ds:
        template = ALPACA_TEMPLATE if (row.get("input") or "").strip() else ALPACA_TEMPLATE_NO_INPUT
        yield template.format(**{k: (row.get(k) or "").strip() for k in ("instruction", "input", "output")}), True


def _record_units(ds, column: str) -> Units:
    for text in ds[column] if len(ds) < 100_000 else (r[column] for r in ds):
        if text:
            yield text, True


def _resolve_source(dataset: str | None, data_dir: str | None, text_field: str) -> _Source:
    key = (dataset or "default").strip()
    low = key.lower()
    if low in ("default", "c4-sample"):
        path = _data_file(data_dir, DEFAULT_C4_SAMPLE, f"calibration dataset {key!r}")
        note = "C4 en train sample (very likely the first 1,000 documents of shard 0, via RedPajama)"
        return _local_source(key, path, "text", note=note)
    if low == "c4-samples":
        files = [_data_file(data_dir, rel, f"calibration dataset {key!r}") for rel in C4_SAMPLES]
        source = _local_source(key, os.path.dirname(files[0]), "text", note="both C4 en train samples (2,000 documents)")
        if sorted(source.files) != sorted(files):
            raise ValueError(f"calibration dataset {key!r}: {os.path.dirname(files[0])} holds other files than "
                             f"{', '.join(C4_SAMPLES)}; pass the folder or the files as a path instead")
        return source
    if low in ("wikitext2", "wikitext-2", "wikitext"):
        ds = _try_hub("Salesforce/wikitext", "wikitext-2-raw-v1")
        if ds is not None:
            return _hub_source(
                key, ds, "Salesforce/wikitext:wikitext-2-raw-v1", lambda d: _joined_text_units(d["text"], "")
            )
        path = _data_file(data_dir, WIKITEXT2_TOKENS_TRAIN, "wikitext2 calibration (offline)")
        note = "WikiText-2 tokenised train split (wikitext-2-v1): rare words are replaced by <unk>"
        logger.warning(
            "wikitext2: the Hub is not reachable, using the offline tokenised train split %s; its rare words "
            "are literal '<unk>' strings, unlike the raw text (use the C4 sample to avoid them)", path
        )
        return _local_source(key, path, text_field, note=note)
    if low in ("ptb", "ptb_text_only"):
        root = data_dir_path(data_dir)
        if os.path.isfile(os.path.join(root, PTB_TRAIN)):
            return _local_source(key, os.path.join(root, PTB_TRAIN), text_field, note="PTB (Mikolov LM version) train")
        ds = _try_hub("ptb_text_only", split="train")
        if ds is not None:
            return _hub_source(key, ds, "ptb_text_only", lambda d: _joined_text_units(d["sentence"], "\n"))
        _data_file(data_dir, PTB_TRAIN, "ptb calibration")  # raises with the data_dir advice
        raise FileNotFoundError(os.path.join(root, PTB_TRAIN))  # pragma: no cover
    if low == "c4":
        ds = _try_hub("allenai/c4", data_files={"train": C4_HUB_SHARD})
        if ds is not None:
            return _hub_source(
                key, ds, f"allenai/c4:{C4_HUB_SHARD}", lambda d: _record_units(d, "text"),
                note="C4 en train shard 0 (first documents only)", large=True,
            )
        path = _data_file(data_dir, DEFAULT_C4_SAMPLE, "c4 calibration (offline fallback)")
        logger.warning("c4: the Hub is not reachable, using the local C4 train sample %s", path)
        return _local_source(key, path, "text", note="C4 en train sample (offline fallback for c4)")
    if low == "alpaca":
        ds = _try_hub("tatsu-lab/alpaca")
        if ds is None:
            raise ConnectionError(
                "alpaca calibration needs the Hugging Face Hub dataset tatsu-lab/alpaca, which is neither "
                "reachable nor in the datasets cache. Download it once with network access, or export it to a "
                ".jsonl file with a 'text' field and pass that path."
            )
        return _hub_source(key, ds, "tatsu-lab/alpaca", _alpaca_units, note="Alpaca, instruction/input/output template")
    expanded = os.path.expanduser(key)
    if os.path.exists(expanded) or os.sep in key or "/" in key or _suffix(key) in SUPPORTED_SUFFIXES:
        return _local_source(key, expanded, text_field)
    raise ValueError(
        f"unknown calibration dataset {key!r}: pass one of {', '.join(NAMED_DATASETS)} or a path to a "
        f".txt/.jsonl/.json/.parquet file or a folder of them"
    )
