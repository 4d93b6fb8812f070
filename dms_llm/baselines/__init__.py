"""One-shot structured-pruning baselines that produce a `PrunePlan`, so pruning, saving and evaluation are
shared with DMS:

    from dms_llm.baselines import METHODS
    plan = METHODS["flap"](model, calib_blocks, target_params)      # at or below target_params
    small = prune_model(model, plan)

| name         | criterion                                               | allocation          | paper |
|--------------|---------------------------------------------------------|---------------------|-------|
| `magnitude`  | L2 norm of a structure's weights                        | uniform             | (classic) |
| `wanda-sp`   | sum |W| * ||X|| over o_proj / down_proj input columns   | uniform             | Sun et al. 2023; structured as in An et al. 2024 |
| `llm-pruner` | first-order Taylor |w dL/dw| summed over the group      | uniform, middle layers | Ma et al. 2023 |
| `flap`       | Var(X) * ||W col||^2, standardised per layer, + bias compensation | global (adaptive) | An et al. 2024 |
| `shortgpt`   | block influence 1 - cos(x_in, x_out)                     | whole layers        | Men et al. 2024 |

Every method takes `(model, calib_blocks, target_params, **options)`; `calib_blocks` is the
[num_samples, seq_len] tensor of `data.load_calibration` (the same for every method; magnitude ignores
it). The parameter count is the search's (`budget.ParameterCounter`), including the output biases FLAP
adds, and kept counts follow the search's rule (`dtopk.kept_count`). The model is only read.
"""

from .common import BudgetError
from .flap import flap_plan
from .llm_pruner import llm_pruner_plan
from .magnitude import magnitude_plan
from .shortgpt import shortgpt_plan
from .wanda_sp import wanda_sp_plan

# Bumped whenever a method's result changes, so cached benchmark rows of an older version are redone.
VERSIONS = {"magnitude": 1, "wanda-sp": 1, "llm-pruner": 1, "flap": 2, "shortgpt": 1}

# Calibration text the authors' own scripts use, where it is more than a benchmark gives every method:
# FLAP's run on 1,024 samples of 128 tokens.
AUTHORS_CALIBRATION_TOKENS = {"flap": 1024 * 128}

METHODS = {
    "magnitude": magnitude_plan,
    "wanda-sp": wanda_sp_plan,
    "llm-pruner": llm_pruner_plan,
    "flap": flap_plan,
    "shortgpt": shortgpt_plan,
}

__all__ = ["AUTHORS_CALIBRATION_TOKENS", "METHODS", "VERSIONS", "BudgetError"]
