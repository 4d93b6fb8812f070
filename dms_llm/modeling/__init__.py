"""The per-layer `dms_llama` architecture: config, model, and its registration with transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_dms_llama import DMSLlamaConfig
from .modeling_dms_llama import DMSLlamaForCausalLM, DMSLlamaModel, DMSLlamaPreTrainedModel

__all__ = [
    "DMSLlamaConfig",
    "DMSLlamaPreTrainedModel",
    "DMSLlamaModel",
    "DMSLlamaForCausalLM",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Make `dms_llama` checkpoints load through the Auto classes, with or without dms_llm.

    - `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` registration: in this process a checkpoint
      loads with the installed classes, no `trust_remote_code` needed.
    - `register_for_auto_class`: `save_pretrained` writes `auto_map` into config.json and copies
      `configuration_dms_llama.py` and `modeling_dms_llama.py` next to the weights, so
      `from_pretrained(path, trust_remote_code=True)` works where dms_llm is not installed.

    Idempotent: every call sets the same mappings (`exist_ok=True`).
    """
    AutoConfig.register(DMSLlamaConfig.model_type, DMSLlamaConfig, exist_ok=True)
    AutoModel.register(DMSLlamaConfig, DMSLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(DMSLlamaConfig, DMSLlamaForCausalLM, exist_ok=True)
    DMSLlamaConfig.register_for_auto_class("AutoConfig")
    DMSLlamaModel.register_for_auto_class("AutoModel")
    DMSLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
