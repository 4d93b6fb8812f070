"""A saved checkpoint folder, read lazily: its config and its safetensors, one tensor at a time.

Exporters convert models far larger than memory, so nothing here loads more than the tensor asked for.
"""

from __future__ import annotations

import json
import os

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A folder that is not a readable safetensors checkpoint."""


class Checkpoint:
    """`config` (a transformers config) and `tensor(name)` for one checkpoint folder."""

    def __init__(self, folder: str):
        from transformers import AutoConfig

        import dms_llm.modeling  # noqa: F401  (registers dms_llama with AutoConfig)

        self.folder = os.path.abspath(folder)
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"{folder} is not a folder; pass a checkpoint folder written by save_pretrained")
        if not os.path.isfile(os.path.join(self.folder, "config.json")):
            raise CheckpointError(f"{folder} has no config.json; pass a checkpoint folder written by save_pretrained")
        self.config = AutoConfig.from_pretrained(self.folder)
        self._file_of = self._tensor_files()
        self._open: dict[str, object] = {}

    def _tensor_files(self) -> dict[str, str]:
        from safetensors import safe_open

        index = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(self.folder, s))})
            if missing:
                raise CheckpointError(f"{self.folder}: shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
            return {name: os.path.join(self.folder, shard) for name, shard in weight_map.items()}
        single = os.path.join(self.folder, SINGLE_FILE)
        if os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        raise CheckpointError(
            f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints can be exported"
        )

    def names(self) -> list[str]:
        return list(self._file_of)

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self._file_of[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.folder}: cannot load its tokenizer ({str(e).splitlines()[0][:300]})") from e
