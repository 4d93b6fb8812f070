"""Write a saved checkpoint (stock Llama / Mistral / Qwen2, or per-layer `dms_llama`) as a GGUF file that
llama.cpp (and Ollama, LM Studio, ...) runs.

Uniform models use llama.cpp's `llama` architecture. Models whose layers differ use `deci`, the one
llama.cpp architecture that reads per-layer head counts and MLP widths (`deci.attention.head_count`,
`deci.attention.head_count_kv` and `deci.feed_forward_length` as arrays, read by `src/models/deci.cpp`).
Two behaviours of `deci` would silently change a pruned model, so the file carries exact stand-ins:
- a layer with attention but no MLP: `deci` skips such a layer's residual add (its attention output
  would be lost), so it gets a one-channel MLP whose weights are zero (it adds exactly zero);
- layer 0 without attention: llama.cpp reads the head size only when layer 0 has heads, so layer 0
  gets one head whose weights are zero (its attention output is exactly zero).

Tensors are read, converted and written one at a time, so exporting needs about one tensor of memory.
The file is written beside the output and renamed into place when complete. The k-quants (q4_k_m, ...)
are llama.cpp's own quantizer run on an f16 file written first beside the output (export/quantize.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.quants import quant_shape_to_byte_shape, quantize

from ..arch import arch_spec, model_shapes
from ..files import write_atomic
from .checkpoint import Checkpoint
from .gguf_vocab import vocab_from_tokenizer
from .quantize import KQUANTS, describe_fallback, fallback_tensors, quantize_gguf, require_llama_cpp

OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Q8_0 packs 32 values per block along a row; a row of another length stays in f16.
Q8_0_BLOCK = 32
_NUMPY_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


class GGUFExportError(ValueError):
    """A checkpoint (or a setting of it) that llama.cpp cannot hold exactly."""


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # Hugging Face layout: (out, in) for a weight
    load: Callable[[], np.ndarray]  # float32 values in that layout
    qtype: GGMLQuantizationType


@dataclass
class Layer:
    """What one decoder layer holds in the GGUF file (stand-ins included)."""

    heads: int
    kv_heads: int
    ff: int
    zero_attention: bool = False  # stand-in head (layer 0 without attention)
    zero_mlp: bool = False  # stand-in MLP (attention without MLP)


def _interleave_rotary_halves(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Transformers rotates the pairs (x_j, x_{j+d/2}) of each head, llama.cpp's `llama`/`deci` rope the
    adjacent pairs (x_2j, x_2j+1): reorder each head's q/k rows (and biases) accordingly."""
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_layers(shapes) -> tuple[str, list[Layer]]:
    heads, kv, ff = shapes.num_heads, shapes.num_kv_heads, shapes.intermediate
    layers = [Layer(h, k, f) for h, k, f in zip(heads, kv, ff)]
    uniform = len(set(heads)) == len(set(kv)) == len(set(ff)) == 1 and kv[0] > 0 and ff[0] > 0
    if uniform:
        return "llama", layers
    for layer in layers:
        if layer.kv_heads and not layer.ff:
            layer.ff, layer.zero_mlp = 1, True
    if not layers[0].kv_heads:
        layers[0].heads, layers[0].kv_heads, layers[0].zero_attention = 1, 1, True
    return "deci", layers


def _rope_settings(config) -> tuple[float, dict, np.ndarray | None]:
    """(theta, scaling keys, llama3 frequency factors or None)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return theta, {}, None
    if rope_type == "linear":
        return theta, {"type": RopeScalingType.LINEAR, "factor": float(params["factor"])}, None
    if rope_type == "llama3":
        # llama.cpp divides each rotary frequency by a factor read from `rope_freqs.weight`; take the
        # factors from transformers' own llama3 frequencies so both sides rotate identically.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        d = config.head_dim
        plain = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        return theta, {}, (plain / scaled.float()).numpy().astype(np.float32)
    raise GGUFExportError(f"rope type {rope_type!r} has no exact llama.cpp equivalent here (supported: default, linear, llama3)")


def _check_supported(config) -> None:
    arch_spec(config)  # raises for families dms_llm does not know
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act {config.hidden_act!r}: llama.cpp's llama/deci MLP is SiLU-gated")
    if getattr(config, "attention_multiplier", None) or getattr(config, "logits_scaling", None):
        raise GGUFExportError("attention/logit multipliers are not part of llama.cpp's llama/deci graphs")


class GGUFPlan:
    """Every tensor and key of the GGUF file for one checkpoint, before anything is written."""

    def __init__(self, checkpoint: Checkpoint, outtype: str):
        if outtype not in OUTTYPES:
            raise GGUFExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
        self.checkpoint, self.outtype = checkpoint, outtype
        config = checkpoint.config
        _check_supported(config)
        self.config, self.spec, self.shapes = config, arch_spec(config), model_shapes(config)
        self.arch, self.layers = _gguf_layers(self.shapes)
        self.theta, self.rope_scaling, self.rope_factors = _rope_settings(config)
        self.notes: list[str] = []
        window = getattr(config, "sliding_window", None)
        if window and window < config.max_position_embeddings:
            self.notes.append(f"sliding window {window}: llama.cpp attends to the whole context (identical up to {window} tokens)")
        self.tensors = self._tensors()

    # ----- tensors ----------------------------------------------------------------------------
    def _qtype(self, shape: tuple[int, ...]) -> GGMLQuantizationType:
        qtype = OUTTYPES[self.outtype][0]
        if len(shape) == 1:
            return GGMLQuantizationType.F32  # norms and biases stay exact, as llama.cpp's own files do
        if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % Q8_0_BLOCK:
            return GGMLQuantizationType.F16
        return qtype

    def _from_checkpoint(self, hf_name: str, gguf_name: str, transform=None) -> OutTensor:
        shape = self.checkpoint.shape(hf_name)

        def load():
            values = self.checkpoint.tensor(hf_name).float().numpy()
            return transform(values) if transform else values

        return OutTensor(gguf_name, shape, load, self._qtype(shape))

    def _zeros(self, gguf_name: str, shape: tuple[int, ...], fill: float = 0.0) -> OutTensor:
        return OutTensor(gguf_name, shape, lambda: np.full(shape, fill, dtype=np.float32), self._qtype(shape))

    def _tensors(self) -> list[OutTensor]:
        spec, shapes, names = self.spec, self.shapes, set(self.checkpoint.names())
        used: set[str] = set()

        def take(hf_name, gguf_name, transform=None):
            if hf_name not in names:
                raise GGUFExportError(f"{self.checkpoint.folder}: tensor {hf_name} is missing")
            used.add(hf_name)
            return self._from_checkpoint(hf_name, gguf_name, transform)

        def optional(hf_name, gguf_name, transform=None):
            return [take(hf_name, gguf_name, transform)] if hf_name in names else []

        out = [take(f"{spec.decoder}.{spec.embed}.weight", "token_embd.weight")]
        if self.rope_factors is not None:
            factors = self.rope_factors
            out.append(OutTensor("rope_freqs.weight", factors.shape, lambda: factors, GGMLQuantizationType.F32))
        hidden, hd = shapes.hidden_size, shapes.head_dim
        for i, layer in enumerate(self.layers):
            src = f"{spec.decoder}.{spec.layers}.{i}."
            attn, mlp = f"{src}{spec.attn}.", f"{src}{spec.mlp}."
            if layer.zero_attention:
                out += [self._zeros(f"blk.{i}.attn_norm.weight", (hidden,), 1.0)]
                out += [self._zeros(f"blk.{i}.attn_{p}.weight", (hd, hidden)) for p in "qkv"]
                out += [self._zeros(f"blk.{i}.attn_output.weight", (hidden, hd))]
            elif layer.kv_heads:
                q_order = lambda w, n=layer.heads: _interleave_rotary_halves(w, n, hd)  # noqa: E731
                k_order = lambda w, n=layer.kv_heads: _interleave_rotary_halves(w, n, hd)  # noqa: E731
                out.append(take(f"{src}{spec.attn_norm}.weight", f"blk.{i}.attn_norm.weight"))
                for proj, gguf, order in ((spec.q, "attn_q", q_order), (spec.k, "attn_k", k_order), (spec.v, "attn_v", None)):
                    out.append(take(f"{attn}{proj}.weight", f"blk.{i}.{gguf}.weight", order))
                    out += optional(f"{attn}{proj}.bias", f"blk.{i}.{gguf}.bias", order)
                out.append(take(f"{attn}{spec.o}.weight", f"blk.{i}.attn_output.weight"))
                out += optional(f"{attn}{spec.o}.bias", f"blk.{i}.attn_output.bias")
            if layer.zero_mlp:
                out += [self._zeros(f"blk.{i}.ffn_norm.weight", (hidden,), 1.0)]
                out += [self._zeros(f"blk.{i}.ffn_{p}.weight", (1, hidden)) for p in ("gate", "up")]
                out += [self._zeros(f"blk.{i}.ffn_down.weight", (hidden, 1))]
            elif layer.ff:
                out.append(take(f"{src}{spec.mlp_norm}.weight", f"blk.{i}.ffn_norm.weight"))
                for proj, gguf in ((spec.gate, "ffn_gate"), (spec.up, "ffn_up"), (spec.down, "ffn_down")):
                    out.append(take(f"{mlp}{proj}.weight", f"blk.{i}.{gguf}.weight"))
                    out += optional(f"{mlp}{proj}.bias", f"blk.{i}.{gguf}.bias")
        out.append(take(f"{spec.decoder}.{spec.final_norm}.weight", "output_norm.weight"))
        if not shapes.tie_word_embeddings:
            out.append(take(f"{spec.lm_head}.weight", "output.weight"))
        unknown = sorted(names - used - {f"{spec.lm_head}.weight"})
        if unknown:
            raise GGUFExportError(f"tensors llama.cpp's {self.arch} graph has no place for: {', '.join(unknown[:5])}")
        kept_f16 = [t.name for t in out if self.outtype == "q8_0" and t.qtype == GGMLQuantizationType.F16]
        if kept_f16:
            self.notes.append(f"{len(kept_f16)} matrices kept in f16 (rows not a multiple of {Q8_0_BLOCK}), e.g. {kept_f16[0]}")
        return out

    # ----- keys -------------------------------------------------------------------------------
    def _per_layer(self, values: list[int]):
        return values[0] if self.arch == "llama" else values

    def write_keys(self, writer: GGUFWriter, name: str, vocab) -> None:
        config, shapes = self.config, self.shapes
        writer.add_type("model")
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(shapes.hidden_size)
        writer.add_block_count(len(self.layers))
        writer.add_feed_forward_length(self._per_layer([layer.ff for layer in self.layers]))
        writer.add_head_count(self._per_layer([layer.heads for layer in self.layers]))
        writer.add_head_count_kv(self._per_layer([layer.kv_heads for layer in self.layers]))
        writer.add_key_length(shapes.head_dim)
        writer.add_value_length(shapes.head_dim)
        writer.add_rope_dimension_count(shapes.head_dim)
        writer.add_rope_freq_base(self.theta)
        if self.rope_scaling:
            writer.add_rope_scaling_type(self.rope_scaling["type"])
            writer.add_rope_scaling_factor(self.rope_scaling["factor"])
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(shapes.vocab_size)
        writer.add_file_type(OUTTYPES[self.outtype][1])
        if self.outtype == "q8_0":
            writer.add_quantization_version(GGML_QUANT_VERSION)
        vocab.write_to(writer)


def _encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype in _NUMPY_TYPES:
        return values.astype(_NUMPY_TYPES[qtype])
    return quantize(values.astype(np.float32), qtype)


def _nbytes_and_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[np.dtype, tuple[int, ...], int]:
    if qtype in _NUMPY_TYPES:
        dtype = np.dtype(_NUMPY_TYPES[qtype])
        return dtype, shape, int(np.prod(shape)) * dtype.itemsize
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return np.dtype(np.uint8), byte_shape, int(np.prod(byte_shape))


def _write_file(writer, path: str, plan: "GGUFPlan", checkpoint_dir: str, vocab, progress: bool) -> None:
    """Keys, tensor infos, then the tensors one at a time (converted as they are written)."""
    plan.write_keys(writer, os.path.basename(os.path.normpath(checkpoint_dir)), vocab)
    for t in plan.tensors:
        dtype, shape, nbytes = _nbytes_and_shape(t.shape, t.qtype)
        raw = None if t.qtype in _NUMPY_TYPES else t.qtype
        writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    tensors = plan.tensors
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="gguf", unit="tensor")
    for t in tensors:
        writer.write_tensor_data(_encode(t.load(), t.qtype))


def export_gguf(checkpoint_dir: str, output: str, outtype: str = "f16", overwrite: bool = False, progress: bool = True,
                threads: int = 0) -> dict:  # fmt: skip
    """Write `checkpoint_dir` as a GGUF file at `output`; returns a summary (architecture, tensors,
    notes; for a k-quant also `fallback`, {tensor: type} of the matrices whose rows no k-quant holds).
    Every check runs before anything is written; the file appears complete or not at all. `threads`:
    llama.cpp's quantizer threads for the k-quants (0: every core)."""
    if outtype not in OUTTYPES and outtype not in KQUANTS:
        raise GGUFExportError(f"--outtype {outtype!r}: choose one of {', '.join([*OUTTYPES, *KQUANTS])}")
    quantized = outtype in KQUANTS
    if quantized:
        require_llama_cpp(outtype)
    output = os.path.abspath(output)
    if os.path.isdir(output):
        raise GGUFExportError(f"--output {output} is a folder; name the .gguf file to write")
    if os.path.exists(output) and not overwrite:
        raise GGUFExportError(f"{output} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(output)):
        raise GGUFExportError(f"the folder of --output {output} does not exist")
    checkpoint = Checkpoint(checkpoint_dir)
    # llama.cpp quantizes from f16, as its own convert-then-quantize route does
    plan = GGUFPlan(checkpoint, "f16" if quantized else outtype)
    vocab = vocab_from_tokenizer(checkpoint.tokenizer(), plan.shapes.vocab_size)  # before anything is written

    def write_plan(path: str) -> None:
        writer = GGUFWriter(path=None, arch=plan.arch)
        try:
            _write_file(writer, path, plan, checkpoint_dir, vocab, progress)
        finally:
            writer.close()

    def write_quantized(tmp: str) -> None:
        source = f"{tmp}.f16"  # beside the output too, and removed whatever happens
        try:
            write_plan(source)
            if progress:
                print(f"quantizing to {outtype} with llama.cpp", file=sys.stderr, flush=True)
            quantize_gguf(source, tmp, outtype, threads)
        finally:
            if os.path.exists(source):
                os.unlink(source)

    write_atomic(output, write_quantized if quantized else write_plan)
    summary = {
        "output": output,
        "architecture": plan.arch,
        "outtype": outtype,
        "tensors": len(plan.tensors),
        "bytes": os.path.getsize(output),
        "stand_ins": {
            "zero_head_layers": [i for i, layer in enumerate(plan.layers) if layer.zero_attention],
            "zero_mlp_layers": [i for i, layer in enumerate(plan.layers) if layer.zero_mlp],
        },
        "notes": plan.notes,
    }
    if quantized:
        summary["fallback"], matrices = fallback_tensors(output, outtype)
        if summary["fallback"]:
            summary["notes"].append(describe_fallback(summary["fallback"], matrices, outtype))
    return summary
