"""A saved checkpoint folder, read lazily: its config, its tokenizer, and its safetensors weights one
tensor at a time (`checkpoints.weights.WeightFiles`).

Exporters convert models far larger than memory, so nothing here loads more than the tensor asked for.
"""

from __future__ import annotations

import os

import torch

from ..checkpoints.weights import WeightFiles


class CheckpointError(ValueError):
    """A folder that is not a readable checkpoint."""


class Checkpoint:
    """`config` (a transformers config), `tokenizer()` and the tensors of one checkpoint folder."""

    def __init__(self, folder: str):
        from transformers import AutoConfig

        from ..modeling import register_auto_classes

        register_auto_classes()
        self.folder = os.path.abspath(folder)
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"{folder} is not a folder; pass a checkpoint folder written by save_pretrained")
        if not os.path.isfile(os.path.join(self.folder, "config.json")):
            raise CheckpointError(f"{folder} has no config.json; pass a checkpoint folder written by save_pretrained")
        self.config = AutoConfig.from_pretrained(self.folder)
        self.weights = WeightFiles(self.folder)

    def names(self) -> list[str]:
        return self.weights.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.weights.shape(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.weights.read(name)

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.folder}: cannot load its tokenizer ({str(e).splitlines()[0][:300]})") from e
