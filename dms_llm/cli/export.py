"""`dms-llm export`: a saved checkpoint in an inference engine's format.

    dms-llm export runs/default --to gguf --outtype q8_0 --output smollm2-80.gguf
    llama-cli -m smollm2-80.gguf -p "The history of"        # or: ollama create smol -f Modelfile

`--to gguf` writes one GGUF file for llama.cpp and everything built on it (Ollama, LM Studio); any
checkpoint dms_llm saves works, stock or per-layer, dense or pruned. f32, f16, bf16 and q8_0 are
written directly; the k-quants (q6_k, q5_k_m, q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k) by llama.cpp's own
quantizer from an f16 file, which needs llama-cpp-python: pip install 'dms_llm[llamacpp]'.
"""

from __future__ import annotations

import argparse
import sys

from ..export import OUTTYPES, export_gguf
from ..export.quantize import KQUANTS, QK_K
from .options import exit_code

FORMATS = ("gguf",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dms-llm export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint folder saved by dms_llm (or any Llama/Mistral/Qwen2 safetensors folder)")
    parser.add_argument("--to", choices=FORMATS, default="gguf", help="target format (default: %(default)s)")
    parser.add_argument("--outtype", choices=[*OUTTYPES, *KQUANTS], default="f16",
                        help="tensor type of the weight matrices; norms and biases stay f32. The k-quants need rows "
                             f"that are a multiple of {QK_K}: llama.cpp stores other matrices in another type, "
                             "and the command lists them (default: %(default)s)")
    parser.add_argument("--output", required=True, help="the file to write, e.g. model.gguf")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of llama.cpp's quantizer, for the k-quants (default: every core)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be 0 (every core) or more")

    def run() -> int:
        summary = export_gguf(args.checkpoint, args.output, args.outtype, overwrite=args.overwrite, threads=args.threads)
        print(f"wrote {summary['output']} ({summary['architecture']} architecture, {summary['outtype']}, "
              f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB)")  # fmt: skip
        for note in summary["notes"]:
            print(f"note: {note}")
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
