"""dms_llm: Differentiable Model Scaling for Llama-family LLMs on Hugging Face Transformers.

Three verbs, one per phase: attach masks (`ModelMasks` + `MaskHooks`), search (`dms_llm.search`),
prune (`prune_model` with a `PrunePlan`). Importing the package registers the per-layer `dms_llama`
architecture with transformers' Auto classes, so pruned checkpoints load without remote code.
"""

from .arch import UnsupportedArchitectureError, arch_spec, register_family
from .budget import ParameterCounter, budget_loss
from .dtopk import DifferentiableTopK, kept_count, normalized_ranks
from .inject import HookTargetError, MaskHooks
from .masks import ModelMasks
from .method import STRUCTURES, DMSConfig
from .modeling import register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "DMSConfig", "DifferentiableTopK", "HookTargetError", "MaskHooks", "ModelMasks", "ParameterCounter", "STRUCTURES",
    "UnsupportedArchitectureError", "arch_spec", "budget_loss", "kept_count", "normalized_ranks", "register_family",
]
