"""`DMSConfig`: every setting of the DMS method in one object, which the search reads and the plan records.

    from dms_llm import DMSConfig, search_plan
    plan = search_plan(model, blocks, target_ratio=0.8, config=DMSConfig(steps=100, spare_last=2))
    plan.metadata["method"]     # this config, as saved in dms_plan.json

The defaults are the method as the DMS paper states it (temperatures, EMA decay, kept-count minimums,
schedule; docs/DESIGN.md); the search options (structures, depth, steps, learning rates, weights) are this project's.
Run settings that do not change what is searched (batch size, seed, checkpoints) are the training
engine's (`dms_llm.training.engine.RunSettings`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STRUCTURES = ("heads", "channels", "hidden", "layers")
DEPTH_MODES = ("sublayer", "block")
WEIGHT_MODES = ("none", "lora", "full")
IMPORTANCE_MODES = ("block", "token")


def parse_structures(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [s for s in names if s]
    unknown = sorted(set(names) - set(STRUCTURES))
    if unknown or not names:
        raise ValueError(f"unknown structure(s) {unknown or names}; choose from {','.join(STRUCTURES)}")
    return tuple(s for s in STRUCTURES if s in names)


@dataclass
class DMSConfig:
    """The DMS method (docs/DESIGN.md, "The method as implemented"). Element kinds: `channel`, `head`, `layer`."""

    # what is searched
    structures: str = "heads,channels,hidden,layers"  # any of heads, channels, hidden, layers
    depth: str = "sublayer"  # sublayer: attention and MLP gated separately; block: whole layers (paper)
    spare_first: int = 0  # the first N decoder layers stay whole (not searched)
    spare_last: int = 0  # the last N decoder layers stay whole
    # the search
    steps: int = 200
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
    # soft-mask temperature lambda = temperature[kind] * N; few heads and layers need steeper sigmoids
    temperature: dict = field(default_factory=lambda: {"channel": 1.0, "head": 4.0, "layer": 4.0})
    single_element_temperature: float = 8.0  # lambda when N = 1
    # k = clamp(round(e N), min_kept[kind], N): a layer may lose every head (no attention sublayer) or
    # vanish, but an MLP and the residual stream need one channel
    min_kept: dict = field(default_factory=lambda: {"channel": 1, "head": 0, "layer": 0})
    # Kept MLP channels and hidden channels are multiples of `align` (or the whole structure). Widths
    # like 565 miss the engines' fast matrix kernels: in llama.cpp a pruned SmolLM2 ran at 0.35x the dense
    # prompt speed unaligned and 1.39x aligned to 32 (docs/RESULTS.md); Q8_0 needs rows of 32. 1 = exact.
    align: int = 32

    def __post_init__(self):
        self.structures = ",".join(parse_structures(self.structures))
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
        if set(self.temperature) != set(self.min_kept):
            raise ValueError(f"temperature and min_kept must name the same element kinds, got {sorted(self.temperature)} "
                             f"and {sorted(self.min_kept)}")

    def temperature_for(self, kind: str, n: int) -> float:
        if kind not in self.temperature:
            raise ValueError(f"unknown element kind {kind!r}; expected one of {sorted(self.temperature)}")
        return self.single_element_temperature if n == 1 else self.temperature[kind] * n

    def spared_layers(self, num_layers: int) -> list[int]:
        """The layers `spare_first` / `spare_last` keep whole; at least one layer must stay searchable."""
        if self.spare_first + self.spare_last >= num_layers:
            raise ValueError(f"spare_first {self.spare_first} and spare_last {self.spare_last} spare all {num_layers} "
                             f"layers of this model; spare fewer than {num_layers} in all")
        return list(range(self.spare_first)) + list(range(num_layers - self.spare_last, num_layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
