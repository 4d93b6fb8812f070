"""Training: the run engine (Accelerate) and the two jobs built on it, as library calls: the DMS search
(`prepare` -> `Searcher`, or `search` for the whole loop) and recovery fine-tuning (`recover`)."""

from .dms import resolve_budget
from .engine import RunSettings, Stopped
from .recovery import RecoveryConfig, RecoveryResult, recover
from .searcher import Searcher, prepare, search, search_plan

__all__ = ["RecoveryConfig", "RecoveryResult", "RunSettings", "Searcher", "Stopped", "prepare", "recover",
           "resolve_budget", "search", "search_plan"]
