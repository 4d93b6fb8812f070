"""The benchmark's two records, typed: `Row`, one cached row (`work/rows/NAME.json`), and `ReportedRow`, a row
of the results file. Both are `TypedDict`s: at run time they are the plain dicts that are written as JSON,
so typing them changes no file (the cached rows and results files of earlier runs keep restoring), while a
type checker and a reader see every key. `tests/test_benchmark.py` checks that written rows use only these
keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict


@dataclass(frozen=True)
class CurvePoint:
    """The recovery of a recovery-curve row: `tokens` of fine-tuning with the curve's recipe. It takes the
    place of the step count that names a standard recovered row (true, like a count above zero)."""

    tokens: int

    def __bool__(self) -> bool:
        return True

    def __str__(self) -> str:
        return f"curve{self.tokens}"


class _RowBase(TypedDict):
    format: str  # ROW_FORMAT
    name: str  # the cache name: method, budget, recovery and a digest of `identity`
    identity: dict[str, Any]  # what the row's results depend on (model, method, budget, calibration, recipes, ...)
    method: str
    budget: float
    recovery: bool  # fine-tuned after pruning (its steps are in `identity`)
    seed: int
    params: int | None  # parameters of the built model; None until it is built
    time_s: float | None  # seconds the plan, search (and fine-tuning) took
    artifact: str | None  # the plan file or the model folder, relative to the work folder (an adopted search: its folder)
    ppl: dict[str, dict]  # perplexity cell key -> {"label", "value", "time_s", ...}
    zero_shot: dict[str, dict]  # task key (task, limit) -> lm-eval metrics
    speed: dict[str, dict]  # speed settings key -> tokens/s of the row and of dense, speedups
    llamacpp: dict[str, dict]  # llama.cpp settings key -> GGUF speeds


class Row(_RowBase, total=False):
    """A cached row: the keys of `_RowBase` from the start (`Benchmark.load_row`), the others as they are known."""

    info: dict[str, Any]  # how it was built: the plan's record, the search's settings, an adopted folder, recovery
    machines: dict[str, str]  # part (build, ppl, ppl/CELL, zero_shot, speed, llamacpp) -> the machine that did it
    dtype: str  # evaluation dtype
    train_dtype: str  # the search's or fine-tuning's dtype
    calib_tokens: int  # calibration text of the pruning: blocks x tokens
    heldout_tokens: int  # a DMS search's held-out blocks x tokens (restarts are scored on them)
    recovery_tokens: int  # tokens the recovery fine-tuning read
    curve_tokens: int  # a recovery-curve row: its point (the tokens asked for)
    restored_from: str  # the results file it was restored from (`--from-results`)
    rebuilt: dict[str, Any]  # a restored row's rebuild: its time, machine and the perplexity check


class _ReportedBase(TypedDict):
    name: str
    method: str
    budget: float
    recovery: bool
    seed: int | None
    params: int | None
    ppl: dict[str, dict[str, float]]  # dataset -> column (protocol, windows) -> perplexity
    zero_shot: dict[str, dict[str, float]]  # task -> metrics and the reported one's stderr
    zero_shot_avg: float | None
    zero_shot_avg_stderr: float | None
    prefill_speedup: float | None
    decode_speedup: float | None
    time_s: float | None
    eval_time_s: dict[str, float]
    machines: dict[str, str]
    dtype: str
    train_dtype: str | None
    calib_tokens: int | None
    recovery_tokens: int | None


class ReportedRow(_ReportedBase, total=False):
    """A row of the results file (`RowMeasurements.report_row`); `--from-results` reads it back."""

    llamacpp_pp_speedup: float | None
    llamacpp_tg_speedup: float | None
    llamacpp_pp: float | None
    llamacpp_tg: float | None
    chosen_seed: int  # the winning seed of a --restarts search
    recipe_name: str  # an adopted search's name without --adopt, when it is the recipe's search
    curve_tokens: int  # a recovery-curve row: its point (the tokens asked for)


ROW_KEYS = frozenset(Row.__required_keys__ | Row.__optional_keys__)
REPORTED_KEYS = frozenset(ReportedRow.__required_keys__ | ReportedRow.__optional_keys__)
