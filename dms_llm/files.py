"""Writing files and folders so that a crash never leaves a half-written one where a complete one is
expected, and hashing files. Every atomic write and folder swap in dms_llm goes through here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import Callable


def cache_root() -> str:
    """`$DMS_LLM_CACHE`, else `~/.cache/dms_llm`; the converted default model, tokenised calibration data
    and dense evaluations live under it."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DMS_LLM_CACHE") or "~/.cache/dms_llm"))


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes a temporary file beside `path`, which then replaces `path` in one rename."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _aside(out: str) -> tuple[str, str]:
    return out + ".saving", out + ".old"


def recover_folder(out: str) -> None:
    """A process killed between the two renames of `swap_in` left only `OUT.old`: it is the only copy."""
    out = os.path.abspath(out).rstrip(os.sep)
    _, old = _aside(out)
    if os.path.isdir(old) and not os.path.exists(out):
        os.replace(old, out)


def swap_in(staging: str, out: str) -> None:
    """Replace the folder `out` (if any) by `staging` in two renames; a failure puts the old one back."""
    out = os.path.abspath(out).rstrip(os.sep)
    _, old = _aside(out)
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.lexists(out):
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if not os.path.exists(out) and os.path.exists(old):
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(old):
        warnings.warn(f"could not delete the replaced folder moved aside to {old}; remove it by hand")


def replace_folder(out: str, fill: Callable[[str], None]) -> None:
    """Replace the folder `out` by the folder `fill(staging)` creates beside it (`OUT.saving`).

    An interruption while filling leaves `out` as it was (the staging folder is removed, or removed by
    the next call); a failure of the swap puts the old folder back.
    """
    out = os.path.abspath(out).rstrip(os.sep)
    staging, old = _aside(out)
    recover_folder(out)
    for leftover in (staging, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    try:
        fill(staging)
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, computed once per (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
