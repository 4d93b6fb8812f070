"""Checkpoints in inference engines' formats: GGUF for llama.cpp and everything built on it (Ollama,
LM Studio), written by `export_gguf` (the k-quants by llama.cpp's own quantizer, `quantize`), and
`llamacpp` to run the files (parity, perplexity, speed).
The command is `dms-llm export` (dms_llm/cli/export.py).
"""

from .checkpoint import Checkpoint, CheckpointError
from .gguf import OUTTYPES, GGUFExportError, export_gguf
from .quantize import KQUANTS

__all__ = ["Checkpoint", "CheckpointError", "GGUFExportError", "KQUANTS", "OUTTYPES", "export_gguf"]
