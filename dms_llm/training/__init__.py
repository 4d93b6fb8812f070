"""Training: the run engine (Accelerate) and the two jobs built on it, as library calls: the DMS search
(`search_plan`) and recovery fine-tuning (`recover`)."""

from .dms import resolve_budget, search_plan
from .engine import RunSettings, Stopped
from .recovery import RecoveryConfig, RecoveryResult, recover

__all__ = ["RecoveryConfig", "RecoveryResult", "RunSettings", "Stopped", "recover", "resolve_budget", "search_plan"]
