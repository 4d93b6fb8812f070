"""`dms-llm export`: a saved checkpoint in an inference engine's format.

    dms-llm export runs/default --to gguf --outtype q8_0 --output smollm2-80.gguf
    llama-cli -m smollm2-80.gguf -p "The history of"        # or: ollama create smol -f Modelfile

`--to gguf` writes one GGUF file for llama.cpp and everything built on it (Ollama, LM Studio); any
checkpoint dms_llm saves works, stock or per-layer, dense or pruned. f32, f16, bf16 and q8_0 are
written directly; the k-quants (q6_k, q5_k_m, q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k) by llama.cpp's own
quantizer from an f16 file, which needs llama-cpp-python: pip install 'dms_llm[llamacpp]'.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..export import OUTTYPES, export_gguf
from ..export.quantize import KQUANTS, QK_K
from ..runs.options import ConfigError, exit_code, option
from ..runs.options import parse_config as _parse_config

FORMATS = ("gguf",)


@dataclass
class ExportConfig:
    """`dms-llm export`."""

    model: str | None = option(None, "a checkpoint folder saved by dms_llm (or any Llama/Mistral/Qwen2 safetensors folder)",
                               positional=True)
    to: str = option("gguf", "target format", choices=FORMATS)
    outtype: str = option("f16", "tensor type of the weight matrices; norms and biases stay f32. The k-quants need rows "
                                 f"that are a multiple of {QK_K}: llama.cpp stores other matrices in another type, and the "
                                 "command lists them", choices=(*OUTTYPES, *KQUANTS))
    output: str | None = option(None, "the file to write, e.g. model.gguf")
    overwrite: bool = option(False, "replace --output if it exists")
    threads: int = option(0, "threads of llama.cpp's quantizer, for the k-quants (0: every core)")

    def __post_init__(self):
        if not self.model or not self.output:
            raise ConfigError("give the checkpoint folder and --output: dms-llm export CHECKPOINT --output FILE")
        if self.threads < 0:
            raise ConfigError("--threads must be 0 (every core) or more")


def main(argv=None) -> int:
    def run() -> int:
        cfg = _parse_config(ExportConfig, argv, __doc__, prog="dms-llm export")
        summary = export_gguf(cfg.model, cfg.output, cfg.outtype, overwrite=cfg.overwrite, threads=cfg.threads)
        print(f"wrote {summary['output']} ({summary['architecture']} architecture, {summary['outtype']}, "
              f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB)")  # fmt: skip
        for note in summary["notes"]:
            print(f"note: {note}")
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
