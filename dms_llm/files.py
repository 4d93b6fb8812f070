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


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_output_folder(out: str, protected: list[tuple[str, str]], overwrite: bool, markers: tuple[str, ...] = (),
                        kind: str = "a model checkpoint", how: str = "pass --overwrite (overwrite=True) to replace it") -> None:
    """The one guard of every output folder, before anything is written. Refuses: a folder that is, lies
    inside or contains one of the `protected` (what, folder) pairs (ValueError); one that contains the
    current or the home folder, a file in its place, a non-empty folder unless `overwrite` (`how` says
    what to do), and with `markers` the overwrite of a folder that holds none of them (so is not `kind`),
    since overwriting deletes it (FileExistsError)."""
    real = os.path.realpath(os.path.abspath(out))
    for what, folder in protected:
        src = os.path.realpath(folder)
        if _inside(real, src):
            raise ValueError(f"refusing to write into {out}, which is inside the {what} {folder} or that folder itself; "
                             "choose another folder")
        if _inside(src, real):
            raise ValueError(f"refusing to write into {out}: it contains the {what} {folder}, which replacing it "
                             "would delete; choose another folder")
    for precious, what in ((os.getcwd(), "the current working directory"), (os.path.expanduser("~"), "the home folder")):
        if _inside(os.path.realpath(precious), real):
            raise FileExistsError(f"refusing to write into {out}: it contains {precious} ({what}); choose a dedicated folder")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder; choose another output folder")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; {how}, or choose another folder")
    if markers and not any(os.path.exists(os.path.join(out, m)) for m in markers):
        raise FileExistsError(f"refusing to --overwrite {out}: it does not look like {kind} (it holds none of "
                              f"{', '.join(markers)}), and overwriting deletes it; choose another folder")


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
