"""A checkpoint folder's safetensors weights, read lazily: one file or shards with their index, the
dtype and shape of every tensor from the headers, one tensor read at a time. Pruning from the files,
the refit that reads its source per pass, and the GGUF export share it: none of them holds more than
the tensor asked for.
"""

from __future__ import annotations

import json
import os

from safetensors import SafetensorError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _safe_open(path: str):
    """A safetensors file opened for reading single tensors into private memory: `pread` where the
    installed safetensors has it (0.8+), so no file mapping grows the resident set; else the default."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.8: no backend argument
        return safe_open(path, framework="pt", device="cpu")



class WeightFiles:
    """The safetensors weights of a checkpoint folder, from their headers only: which file holds each
    tensor (`where`), with its dtype and shape. `read(name)` reads one tensor."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_NAME)
        weight_map = None
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError("weight_map is not a non-empty object")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
                raise FileNotFoundError(
                    f"{folder}: {len(missing)} of the {len(files)} weight shards named by {INDEX_NAME} are missing ({shown})"
                )
        elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            files = [WEIGHTS_NAME]
        else:
            raise FileNotFoundError(
                f"{folder} has no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}); pruning from the files "
                "reads safetensors checkpoints only"
            )
        self.files = files
        self.where: dict[str, str] = {}
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                with _safe_open(os.path.join(folder, name)) as f:
                    for key in f.keys():
                        part = f.get_slice(key)
                        self.where[key], self.dtypes[key], self.shapes[key] = name, part.get_dtype(), tuple(part.get_shape())
            except (SafetensorError, OSError) as e:  # a corrupt or truncated header
                raise OSError(f"cannot read the safetensors header of {os.path.join(folder, name)}: {e}") from e
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if self.where.get(k) != f]
            if wrong:
                raise ValueError(f"{index_path} places {wrong[0]!r} in {weight_map[wrong[0]]}, which does not hold it "
                                 f"({len(wrong)} such entries)")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str):
        with _safe_open(os.path.join(self.folder, self.where[name])) as f:
            return f.get_tensor(name)

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]
