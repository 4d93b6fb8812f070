"""Calibration text -> packed token blocks, cached on disk.

Packing: every document is tokenised without special tokens, documents are joined with one EOS
between them (when the tokenizer has one), the stream is cut into non-overlapping blocks of
`seq_len`, and `num_samples` blocks are drawn by a seeded permutation of the block indices. Blocks
therefore come from anywhere in the source, and the same (source, tokenizer, seq_len, num_samples,
seed) always gives the same tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable

import torch

from ..files import cache_root, sha256_file, write_atomic
from .sources import _BATCH, _LARGE_SOURCE_TOKEN_MARGIN, _resolve_source, _Source

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return enc["input_ids"]


def tokenize_units(tokenizer, units: Iterable[tuple[str, bool]], max_tokens: int | None = None) -> torch.Tensor:
    """One flat token stream: units tokenised without special tokens, EOS between documents.

    Stops once the stream holds `max_tokens` tokens (None: all units)."""
    eos = tokenizer.eos_token_id
    parts: list[torch.Tensor] = []
    total = 0
    any_doc = False
    batch: list[tuple[str, bool]] = []

    def flush() -> None:
        nonlocal total, any_doc
        ids = _tokenize(tokenizer, [t for t, _ in batch])
        for (_, starts), seq in zip(batch, ids):
            if starts and any_doc and eos is not None:
                parts.append(torch.tensor([eos], dtype=torch.long))
                total += 1
            if seq:
                parts.append(torch.tensor(seq, dtype=torch.long))
                total += len(seq)
                any_doc = True
        batch.clear()

    pending_start = False  # a skipped blank unit that opened a document hands that over to the next
    for text, starts in units:
        if not text or not text.strip():
            if starts:
                pending_start = True
            elif text:  # whitespace inside a document is part of it
                batch.append((text, False))
            continue
        batch.append((text, starts or pending_start))
        pending_start = False
        if len(batch) >= _BATCH:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    if batch:
        flush()
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def pack_blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a flat stream into non-overlapping [n, seq_len] blocks; the tail shorter than seq_len is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def select_blocks(blocks: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(blocks.shape[0], generator=g)[:num_samples]
    return blocks[order].clone()


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "data")


def _tokenizer_identity(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        digest.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest.hexdigest(),
        "eos_token_id": tokenizer.eos_token_id,
    }


def _cache_key(source: _Source, tokenizer_id: dict, seq_len: int, num_samples: int, seed: int) -> str:
    payload = {
        "format": _CACHE_FORMAT,
        "source": [source.kind, source.location, source.identity, source.text_field],
        "tokenizer": tokenizer_id,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _in_memory_units(dataset, text_field: str):
    """Units of a list of strings (one document each) or a `datasets.Dataset` (field `text_field`, one
    document per row); None for a name or a path."""
    if isinstance(dataset, (list, tuple)):
        bad = next((type(t).__name__ for t in dataset if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"calibration texts must be strings, got a {bad} among them")
        return ((text, True) for text in dataset)
    if not hasattr(dataset, "column_names"):
        return None
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"the dataset has no {text_field!r} column (columns: {', '.join(columns)}); pass text_field=...")
    return ((row[text_field], True) for row in dataset)


def _draw_blocks(stream: torch.Tensor, seq_len: int, num_samples: int, seed: int, where: str) -> tuple[torch.Tensor, int]:
    """`num_samples` blocks of the packed stream, drawn by a seeded permutation, and how many there were."""
    if stream.numel() == 0:
        raise ValueError(f"calibration data {where} holds no text (empty file, or every record empty)")
    blocks = pack_blocks(stream, seq_len)
    if blocks.shape[0] < num_samples:
        raise ValueError(
            f"calibration data {where} gives {stream.numel():,} tokens = {blocks.shape[0]} block(s) of "
            f"seq_len={seq_len}, but num_samples={num_samples} were asked. Lower num_samples "
            f"(at most {blocks.shape[0]}) or seq_len, or use a larger dataset."
        )
    return select_blocks(blocks, num_samples, seed), blocks.shape[0]


def load_calibration(
    dataset,
    tokenizer,
    seq_len: int,
    num_samples: int,
    seed: int = 0,
    text_field: str = "text",
    cache_dir: str | None = None,
    data_dir: str | None = None,
) -> torch.Tensor:
    """`num_samples` packed blocks of `seq_len` tokens from a training text, as a [num_samples, seq_len] LongTensor.

    `dataset`: a list of strings (one document each), a `datasets.Dataset` (field `text_field`, one
    document per row), None/"default"/"c4-sample" (the offline C4 train sample in the data folder
    `data_dir`, else $DMS_DATA_DIR), "wikitext2", "ptb", "c4", "alpaca", or a path to a .txt (whole text =
    one document), .jsonl/.json/.parquet (field `text_field`, one document per record) file or a folder
    of them. Blocks from names and paths are cached in `cache_dir` (default `$DMS_LLM_CACHE/data`, i.e.
    ~/.cache/dms_llm/data); texts in memory are tokenised each time.
    """
    if int(seq_len) < 1 or int(num_samples) < 1:
        raise ValueError(f"seq_len and num_samples must be positive, got seq_len={seq_len}, num_samples={num_samples}")
    seq_len, num_samples, seed = int(seq_len), int(num_samples), int(seed)
    units = _in_memory_units(dataset, text_field)
    if units is not None:
        return _draw_blocks(tokenize_units(tokenizer, units), seq_len, num_samples, seed, "in memory")[0]
    source = _resolve_source(os.fspath(dataset) if isinstance(dataset, os.PathLike) else dataset, data_dir, text_field)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    key = _cache_key(source, _tokenizer_identity(tokenizer), seq_len, num_samples, seed)
    cache_path = os.path.join(cache_dir, f"calib-{key}.pt")
    if os.path.isfile(cache_path):
        try:
            cached = torch.load(cache_path, weights_only=True)
            ids = cached["input_ids"]
            if tuple(ids.shape) == (num_samples, seq_len):
                logger.info("calibration data from cache %s", cache_path)
                return ids.long()
        except Exception as e:  # a truncated or foreign file is rebuilt, not trusted
            logger.warning("ignoring unreadable calibration cache %s (%s)", cache_path, e)

    needed = num_samples * seq_len
    max_tokens = needed * _LARGE_SOURCE_TOKEN_MARGIN if source.large else None
    stream = tokenize_units(tokenizer, source.units(), max_tokens=max_tokens)
    where = f"{source.location}" + (f" (field {source.text_field!r})" if source.text_field else "")
    ids, available = _draw_blocks(stream, seq_len, num_samples, seed, where)
    meta = {
        "dataset": source.name,
        "source": source.location,
        "kind": source.kind,
        "split": source.split,
        "stream_tokens": int(stream.numel()),
        "available_blocks": available,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "seed": seed,
    }
    logger.info(
        "calibration: %d x %d tokens from %s (%d blocks available)", num_samples, seq_len, where, available
    )
    try:
        write_atomic(cache_path, lambda tmp: torch.save({"input_ids": ids, "meta": meta}, tmp))
    except OSError as e:  # a read-only cache must not stop a run
        logger.warning("could not write the calibration cache %s: %s", cache_path, e)
    return ids


def describe_dataset(dataset: str | None = None, data_dir: str | None = None, text_field: str = "text") -> dict:
    """Provenance of a calibration source for metrics and model cards: what was read, which split, hashes.

    Resolves exactly as `load_calibration` does (Hub when reachable, else the offline fallback)."""
    source = _resolve_source(dataset, data_dir, text_field)
    info = {
        "dataset": source.name,
        "kind": source.kind,
        "source": source.location,
        "split": source.split,
        "text_field": source.text_field,
        "note": source.note,
    }
    if source.kind == "local":
        files = [{"path": f, "bytes": os.path.getsize(f), "sha256": sha256_file(f)} for f in source.files]
        info["files"] = files
        if len(files) == 1:
            info["sha256"] = files[0]["sha256"]
        else:  # one hash over the (relative name, file hash) list, so a folder has a single identity
            h = hashlib.sha256()
            for f in files:
                h.update(f"{os.path.relpath(f['path'], source.location)}\t{f['sha256']}\n".encode())
            info["sha256"] = h.hexdigest()
    else:
        info["sha256"] = None
        info["fingerprint"] = source.identity[2]
        info["rows"] = source.identity[3]
    return info
