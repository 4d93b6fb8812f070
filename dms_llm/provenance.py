"""`PlanRecord`: how a plan was made (the "metadata" of `dms_plan.json`), one typed record.

The search, the baselines, the refit and the commands each add what they know (the method and its budget,
the command line, the search's timings, the parity check, the refit, a fine-tuning); the model card, the
fine-tuning command and the benchmark read it back. Every field is optional: a plan made by hand records
nothing, a baseline's plan no search.

In JSON the record is a flat object, the same as the untyped dict it replaces, so every `dms_plan.json`
written before it loads unchanged (keys this version does not know are kept in `extra` and written back).
It also reads like that dict (`record["heldout_loss"]`, `"refit" in record`, `record.get("method")`), the
view older callers and saved notebooks use; code in this package uses the attributes.

    plan.metadata.command = "dms-llm search --config recipes/smollm2-135m-default.yaml"
    plan.metadata.to_dict()   # {"method": {...}, "command": "dms-llm search ...", "target_params": 107612006, ...}
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(eq=False)  # equality is the mapping's: a record equals the dict it writes
class PlanRecord(MutableMapping):
    """How a plan was made. `None` = not recorded (left out of the JSON)."""

    # What made the plan: a DMS search's config as given (`DMSConfig.to_dict()`, read back with
    # `DMSConfig.from_plan`), or a baseline's name ("flap", ...) with its scoring criterion and allocation.
    method: dict | str | None = None
    criterion: str | None = None
    allocation: str | None = None
    # The command line that made the plan (a fine-tuned checkpoint's: the pruning command, "# then", its own);
    # the model card's "How it was made" shows it.
    command: str | None = None
    target_params: int | None = None
    # A DMS search: the settings of `dms-llm search` (a dict of its options), the fit of the kept ratios to the
    # budget, the searching time, the processes and the plan each of them reached (sha256, checked equal).
    search: dict | None = None
    budget_fit: dict | None = None
    search_time_s: float | None = None
    num_processes: int | None = None
    plan_sha256_per_rank: list | None = None
    # Checks of the pruned model: max |logit difference| to the binarised masked model on a probe block, the
    # next-token loss on held-out calibration blocks (and after the refit).
    masked_vs_pruned_max_abs_logit_diff: float | None = None
    heldout_loss: float | None = None
    heldout_loss_after_refit: float | None = None
    # After the plan: the output projections refit (`refit_output_projections`' report), a fine-tuning
    # (`dms-llm finetune`'s settings), a baseline's plan time (the benchmark).
    refit: dict | None = None
    finetune: dict | None = None
    time_s: float | None = None
    # A method's own facts (a baseline's keep fractions, ShortGPT's block influences, ...) and keys of other
    # dms_llm versions, kept as they are.
    extra: dict = field(default_factory=dict)

    def then(self, command: str) -> None:
        """Record a command that came after the plan (a refit of the files, a fine-tuning): the commands in
        the order they ran, so a checkpoint's card tells every step."""
        self.command = f"{self.command}\n# then\n{command}" if self.command else command

    # ----- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The flat JSON object: the recorded fields in their order, then `extra`."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS if getattr(self, f.name) is not None}
        return out | self.extra

    @classmethod
    def from_dict(cls, d: dict | PlanRecord | None) -> PlanRecord:
        """A record from a plan's "metadata" object (any dms_llm version), or a copy of a record."""
        if isinstance(d, PlanRecord):
            return dataclasses.replace(d, extra=dict(d.extra))
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise TypeError(f"a plan's metadata is a JSON object, got {type(d).__name__}")
        known = {k: v for k, v in d.items() if k in _NAMES and v is not None}
        return cls(**known, extra={k: v for k, v in d.items() if k not in _NAMES})

    # ----- the dict view (older callers) -------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in _NAMES:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _NAMES:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in _NAMES:
            if getattr(self, key) is None:
                raise KeyError(key)
            setattr(self, key, None)
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other) -> bool:
        if isinstance(other, (PlanRecord, dict)):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # mutable, like the dict it stands for

    def __repr__(self) -> str:
        return f"PlanRecord({self.to_dict()!r})"


_FIELDS = [f for f in dataclasses.fields(PlanRecord) if f.name != "extra"]
_NAMES = frozenset(f.name for f in _FIELDS)
