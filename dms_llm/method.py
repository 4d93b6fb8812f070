"""`DMSConfig`: every setting of the DMS method in one typed object, which the search reads and the plan records.

    from dms_llm import DMSConfig, prepare
    config = DMSConfig(target_ratio=0.8, spare_last=2)
    searcher = prepare(model, config)
    DMSConfig.from_dict(config.to_dict()) == config       # what dms_plan.json records as metadata["method"]

The defaults are the recommended recipe for any model and budget (recipes/smollm2-135m-widths.yaml: head,
MLP and hidden widths, no depth, 240 steps, widths in multiples of 32; SmolLM2-135M's default recipe at 80%
searches the MLP widths alone, docs/RESULTS.md 19) and, for the operator, the method as the DMS paper states it (temperatures,
EMA decay, kept-count minimums, schedule; docs/DESIGN.md). Run settings that do not change what is
searched (batch size, data order, checkpoints) are the training engine's (`dms_llm.RunSettings`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STRUCTURES = ("heads", "channels", "hidden", "layers")
DEPTH_MODES = ("sublayer", "block")
WEIGHT_MODES = ("none", "lora", "full")
IMPORTANCE_MODES = ("block", "token")
KINDS = ("channel", "head", "layer")
# Depth gates are left out: with them four seeds of the default recipe dropped 0-3 of the 30 MLP sublayers
# of SmolLM2 by chance and spread 1.56x on WikiText-2 validation; without them the medians fell 19-21%
# (docs/RESULTS.md 13).
DEFAULT_STRUCTURES = ("heads", "channels", "hidden")
# Widths like 565 miss the engines' fast matrix kernels: in llama.cpp a pruned SmolLM2 ran at 0.35x the
# dense prompt speed unaligned and 1.39x aligned to 32 (docs/RESULTS.md 10); Q8_0 needs rows of 32.
DEFAULT_ALIGN = 32
# Fields that plans written before they existed do not record, with the value that reproduces those plans.
_LEGACY_VALUES = {"align": 1}
_RENAMED = {"align_to_budget": "fit_budget"}


def parse_structures(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Structure names from `heads,channels` text or a sequence, checked and in canonical order."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [s for s in names if s]
    unknown = sorted(set(names) - set(STRUCTURES))
    if unknown or not names:
        raise ValueError(f"unknown structure(s) {unknown or names}; choose from {','.join(STRUCTURES)}")
    return tuple(s for s in STRUCTURES if s in names)


@dataclass(frozen=True)
class Temperatures:
    """Soft-mask steepness per element kind: lambda = value x N. Few heads and layers need steeper sigmoids."""

    channel: float = 1.0
    head: float = 4.0
    layer: float = 4.0


@dataclass(frozen=True)
class MinKept:
    """The fewest elements a structure keeps, per kind: a layer may lose every head (no attention
    sublayer) or vanish, but an MLP and the residual stream need one channel."""

    channel: int = 1
    head: int = 0
    layer: int = 0


@dataclass
class DMSConfig:
    """The DMS method (docs/DESIGN.md, "The method as implemented"). Element kinds: `channel`, `head`, `layer`."""

    # the budget: one of the two (none: give it to the search call)
    target_ratio: float | None = None  # a fraction of the dense parameter count, e.g. 0.8
    target_params: int | None = None  # parameters of the pruned model, e.g. 5_470_000_000
    # what is searched
    structures: tuple[str, ...] = DEFAULT_STRUCTURES  # any of heads, channels, hidden, layers
    depth: str = "sublayer"  # sublayer: attention and MLP gated separately; block: whole layers (paper)
    spare_first: int = 0  # the first N decoder layers stay whole (not searched)
    spare_last: int = 0  # the last N decoder layers stay whole
    # the search
    steps: int = 240  # the recipe's: 9-14 minutes for SmolLM2-135M on two CPU cores
    ratio_lr: float = 1e-2  # Adam, constant, no weight decay, on the kept ratios
    budget_weight: float = 2.0  # lambda_res
    schedule_fraction: float = 0.8  # the target descends over this fraction of the steps; then refine
    # The refine phase holds the budget: the hidden width freezes with heads and depth (one aligned step of
    # it is several percent of the model, so near the target it flips between two widths and the last step
    # decides), and the budget term becomes two-sided, so the MLP widths settle onto the target from either side
    hold_budget: bool = False
    fit_budget: bool = True  # at the end, rescale the kept ratios so the hard count meets the budget
    # Taylor importances start as the mean over this many calibration blocks (the unmasked model's),
    # instead of from zero: the first masks then rank elements on more tokens than one step sees
    warmup_blocks: int = 0
    # the model's weights during the search
    train_weights: str = "none"  # none (frozen), lora, full
    weight_lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    distill: bool = False  # KL to the unpruned model's logits
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # Taylor scores per step: "block" squares the gradient summed over the block (the paper); "token" sums
    # each token's squared contribution, so contributions of opposite sign do not cancel (see masks.py)
    importance: str = "block"
    # the operator (DMS section 1)
    ema_decay: float = 0.99  # Taylor-importance EMA: c <- decay c + (1 - decay) (m dL/dm)^2
    temperature: Temperatures = field(default_factory=Temperatures)
    single_element_temperature: float = 8.0  # lambda when N = 1
    min_kept: MinKept = field(default_factory=MinKept)  # k = clamp(round(e N), min_kept[kind], N)
    align: int = DEFAULT_ALIGN  # kept MLP and hidden channels in multiples of this (or all); 1 = exact

    def __post_init__(self):
        if isinstance(self.structures, str):
            raise TypeError(f"structures is a tuple of names, e.g. {DEFAULT_STRUCTURES}, not the text {self.structures!r} "
                            "(DMSConfig.from_dict and dms_llm.method.parse_structures read text)")
        self.structures = parse_structures(self.structures)
        if not isinstance(self.temperature, Temperatures) or not isinstance(self.min_kept, MinKept):
            raise TypeError("temperature and min_kept are Temperatures(...) and MinKept(...); DMSConfig.from_dict reads dicts")
        self._check_budget()
        if self.depth not in DEPTH_MODES:
            raise ValueError(f"depth must be one of {', '.join(DEPTH_MODES)}, got {self.depth!r}")
        if self.train_weights not in WEIGHT_MODES:
            raise ValueError(f"train_weights must be one of {', '.join(WEIGHT_MODES)}, got {self.train_weights!r}")
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_MODES)}, got {self.importance!r}")
        if self.spare_first < 0 or self.spare_last < 0:
            raise ValueError(f"spare_first and spare_last must be >= 0, got {self.spare_first} and {self.spare_last}")
        if self.warmup_blocks < 0:
            raise ValueError(f"warmup_blocks must be >= 0, got {self.warmup_blocks}")
        if self.steps < 1 or not 0 < self.schedule_fraction <= 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("steps must be >= 1, schedule_fraction in (0, 1], ema_decay in [0, 1)")
        if not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"align must be a positive integer (1: no alignment), got {self.align!r}")

    def _check_budget(self) -> None:
        if self.target_ratio is not None and self.target_params is not None:
            raise ValueError(f"give one of target_ratio and target_params, got {self.target_ratio} and {self.target_params}")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ValueError(f"target_ratio must lie in (0, 1), got {self.target_ratio}")
        if self.target_params is not None:
            if int(self.target_params) != self.target_params or self.target_params < 1:
                raise ValueError(f"target_params must be a positive whole number, got {self.target_params}")
            self.target_params = int(self.target_params)

    def temperature_for(self, kind: str, n: int) -> float:
        if kind not in KINDS:
            raise ValueError(f"unknown element kind {kind!r}; expected one of {KINDS}")
        return self.single_element_temperature if n == 1 else getattr(self.temperature, kind) * n

    def min_kept_for(self, kind: str) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown element kind {kind!r}; expected one of {KINDS}")
        return getattr(self.min_kept, kind)

    def spared_layers(self, num_layers: int) -> list[int]:
        """The layers `spare_first` / `spare_last` keep whole; at least one layer must stay searchable."""
        if self.spare_first + self.spare_last >= num_layers:
            raise ValueError(f"spare_first {self.spare_first} and spare_last {self.spare_last} spare all {num_layers} "
                             f"layers of this model; spare fewer than {num_layers} in all")
        return list(range(self.spare_first)) + list(range(num_layers - self.spare_last, num_layers))

    def to_dict(self) -> dict:
        """JSON-ready: the tuple of structures as a list, the per-kind values as dicts."""
        d = dataclasses.asdict(self)
        d["structures"] = list(self.structures)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DMSConfig":
        """The inverse of `to_dict`. Also reads what plans recorded before the config was typed
        (`"heads,channels"` text, a field's old name); unknown keys are an error."""
        d = {_RENAMED.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown DMSConfig field(s) {unknown}")
        if "structures" in d:
            d["structures"] = parse_structures(d["structures"])
        for name, kind in (("temperature", Temperatures), ("min_kept", MinKept)):
            if isinstance(d.get(name), dict):
                d[name] = kind(**d[name])
        return cls(**d)

    @classmethod
    def from_plan(cls, plan) -> "DMSConfig":
        """The config a DMS search recorded in its plan (`plan.metadata.method`), for plans of any
        dms_llm version: a field the plan predates takes the value that reproduces it."""
        record = plan.metadata.method
        if not isinstance(record, dict):
            raise ValueError(f"plan of {plan.source_model!r} records no DMS method (a baseline's plan, or hand-made)")
        return cls.from_dict({**_LEGACY_VALUES, **record})
