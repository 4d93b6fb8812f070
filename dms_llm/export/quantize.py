"""k-quant GGUF files (q4_k_m and its neighbours, what llama.cpp and Ollama users run) made by llama.cpp's
own quantizer, as llama-cpp-python ships it (the `llamacpp` extra), from the f16 file `export_gguf` writes.

llama.cpp picks a type per tensor (q4_k_m keeps attn_v and ffn_down of some layers in q6_K, ...), and
k-quants pack 256 values per block along a row: a matrix whose rows are not a multiple of 256 gets
another type. `fallback_tensors` reads those from the written file, so the report is what the file holds.
"""

from __future__ import annotations

import ctypes
import os

from gguf import GGMLQuantizationType, GGUFReader

from ..errors import ActionableError

# --outtype -> (llama.cpp file type, the type a matrix gets unless llama.cpp's rules or its rows pick another)
KQUANTS = {
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", GGMLQuantizationType.Q6_K),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", GGMLQuantizationType.Q5_K),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", GGMLQuantizationType.Q4_K),
    "q4_k_s": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", GGMLQuantizationType.Q4_K),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", GGMLQuantizationType.Q4_0),
    "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", GGMLQuantizationType.Q3_K),
    "q2_k": ("LLAMA_FTYPE_MOSTLY_Q2_K", GGMLQuantizationType.Q2_K),
}
QK_K = 256  # values per k-quant block
INSTALL_HINT = "pip install 'dms_llm[llamacpp]'"


def require_llama_cpp(outtype: str):
    """The `llama_cpp` module, or an ImportError that names the extra (checked before anything is written)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"--outtype {outtype} runs llama.cpp's quantizer, which needs llama-cpp-python: {INSTALL_HINT}") from e
    return llama_cpp


def quantize_gguf(source: str, output: str, outtype: str, threads: int = 0) -> list[str]:
    """Quantize the f16/f32 GGUF `source` into `output` (written in place: the caller makes it atomic).
    Returns llama.cpp's log lines, which it would otherwise print to stderr (one or more per tensor)."""
    llama_cpp = require_llama_cpp(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[outtype][0])
    params.nthread = threads  # 0: llama.cpp uses every core
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    # Route llama.cpp's log here while it quantizes, then give the previous callback back.
    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(collect, None)
    try:
        failed = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(output), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(previous, previous_data)
    log = "".join(lines).splitlines()
    if failed:
        reason = [line for line in log if "failed" in line or "error" in line.lower()]
        raise ActionableError(f"llama.cpp could not quantize to {outtype}: {(reason or log or ['no message'])[-1].strip()}")
    return log


def fallback_tensors(path: str, outtype: str) -> tuple[dict[str, str], int]:
    """({tensor: type} of the matrices whose rows are not a multiple of 256 and which llama.cpp stored in
    another type than `outtype`'s main one, the number of matrices in the file). For the k-quants that is
    every such matrix (no k-quant holds its rows: llama.cpp uses q5_0, q8_0, ... instead); for q4_0, whose
    blocks are 32 wide, the ones llama.cpp wanted in a k-quant (the output matrix, q6_K) and those whose
    rows are not even a multiple of 32 (f16)."""
    main = KQUANTS[outtype][1]
    matrices = [t for t in GGUFReader(path).tensors if len(t.shape) >= 2]
    # GGUF lists a tensor's row length first
    fallback = {t.name: t.tensor_type.name.lower() for t in matrices if int(t.shape[0]) % QK_K and t.tensor_type != main}
    return fallback, len(matrices)


def describe_fallback(fallback: dict[str, str], matrices: int, outtype: str) -> str:
    """One line: how many matrices fell back, and which, grouped by tensor kind and type."""
    groups: dict[tuple[str, str], int] = {}
    for name, qtype in fallback.items():
        kind = ".".join(name.split(".")[2:]) if name.startswith("blk.") else name
        groups[kind, qtype] = groups.get((kind, qtype), 0) + 1
    listed = ", ".join(f"{kind} {qtype}" + (f" x{n}" if n > 1 else "") for (kind, qtype), n in sorted(groups.items()))
    return (f"{len(fallback)} of {matrices} matrices are not {KQUANTS[outtype][1].name.lower()}: their rows are not a "
            f"multiple of {QK_K} (the k-quant block), so llama.cpp stored them as {listed}")  # fmt: skip
