"""dms_llm: Differentiable Model Scaling for Llama-family LLMs on Hugging Face Transformers.

    import dms_llm
    model, tokenizer = dms_llm.load_model_and_tokenizer("smollm2-135m")
    blocks = dms_llm.load_calibration("default", tokenizer, seq_len=256, num_samples=256, data_dir="../shared/data")
    plan = dms_llm.search(model, blocks, dms_llm.DMSConfig(target_ratio=0.8))
    dms_llm.save_pruned(dms_llm.convert(model, plan), tokenizer, "out/")

One verb per phase: `prepare` attaches the masks and returns the `Searcher` that trains them (`step` in
your loop, or `search` for the whole loop), `Searcher.plan` reads the kept indices (`PrunePlan`), `convert`
builds the smaller model. Importing the package registers the per-layer `dms_llama` architecture with
transformers' Auto classes, so pruned checkpoints load without remote code.
"""

from .arch import UnsupportedArchitectureError, arch_spec, register_family
from .budget import ParameterCounter, budget_loss
from .checkpoints import load_model_and_tokenizer, save_pruned
from .data import load_calibration
from .dtopk import DifferentiableTopK, kept_count, normalized_ranks
from .inject import HookTargetError, MaskHooks
from .masks import ModelMasks
from .method import STRUCTURES, DMSConfig, MinKept, Temperatures
from .modeling import register_auto_classes
from .plan import PrunePlan
from .provenance import PlanRecord
from .prune import convert, plan_of, prune_model
from .refit import refit_output_projections
from .training import RunSettings, Searcher, Stopped, prepare, search, search_plan

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "DMSConfig", "DifferentiableTopK", "HookTargetError", "MaskHooks", "MinKept", "ModelMasks", "ParameterCounter",
    "PlanRecord", "PrunePlan", "RunSettings", "STRUCTURES", "Searcher", "Stopped", "Temperatures", "UnsupportedArchitectureError",
    "arch_spec", "budget_loss", "convert", "kept_count", "load_calibration", "load_model_and_tokenizer",
    "normalized_ranks", "plan_of", "prepare", "prune_model", "refit_output_projections", "register_family",
    "save_pruned", "search", "search_plan",
]
