"""What the benchmark measures of every row besides its model: the perplexity cells (a dataset under a
protocol, on some windows, for some budgets) and the zero-shot average with its standard error."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PPLCell:
    """One perplexity measurement asked of the rows: a dataset under a protocol, on the first `max_windows`
    windows (None: the whole split), for the pruned rows at `budgets` only (None: every row). The dense row,
    the reference, gets every cell."""

    dataset: str
    protocol: str
    max_windows: int | None = None
    budgets: tuple[float, ...] | None = None
    column: str = ""  # the report's key under the dataset's label (the protocol, unless two cells share it)

    def applies(self, method: str, budget: float) -> bool:
        return self.budgets is None or method == "dense" or any(abs(budget - b) < 1e-9 for b in self.budgets)

    def describe(self) -> str:
        from ..evaluation.perplexity import PROTOCOLS

        windows = "the whole split" if self.max_windows is None else f"the first {self.max_windows}"
        rows = "every row" if self.budgets is None else "the " + ", ".join(f"{b:g}" for b in self.budgets) + " rows and dense"
        return f"{self.dataset} ({self.column}) = {PROTOCOLS[self.protocol]}-token windows, {windows}, {rows}"


def parse_ppl_extra(spec: str) -> list[PPLCell]:
    """`DATASETS:PROTOCOL[:WINDOWS[:BUDGETS]]`, e.g. `wikitext2,ptb:sparsegpt:all:0.8`: WINDOWS a number or
    `all` (the whole split, the default), BUDGETS a comma list (default: every budget)."""
    from ..evaluation.perplexity import check_ppl_datasets, check_protocols

    parts = spec.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"--ppl-extra {spec!r}: expected DATASETS:PROTOCOL[:WINDOWS[:BUDGETS]], "
                         "e.g. wikitext2,ptb:sparsegpt:all:0.8")
    datasets, protocols = check_ppl_datasets(parts[0]), check_protocols(parts[1])
    if not datasets or len(protocols) != 1:
        raise ValueError(f"--ppl-extra {spec!r}: name at least one dataset and exactly one protocol")
    windows = parts[2].strip() if len(parts) > 2 else "all"
    if windows in ("", "all"):
        max_windows = None
    else:
        try:
            max_windows = int(windows)
        except ValueError:
            max_windows = 0
        if max_windows < 1:
            raise ValueError(f"--ppl-extra {spec!r}: WINDOWS must be a positive number or 'all', got {windows!r}")
    budgets = None
    if len(parts) > 3 and parts[3].strip() not in ("", "all"):
        try:
            budgets = tuple(float(b) for b in parts[3].split(",") if b.strip())
        except ValueError:
            budgets = ()
        if not budgets:
            raise ValueError(f"--ppl-extra {spec!r}: BUDGETS must be a comma list of fractions")
    return [PPLCell(d, protocols[0], max_windows, budgets) for d in datasets]


def ppl_cells(ppl, protocols, max_windows, extra) -> list[PPLCell]:
    """The perplexity cells of a benchmark: every --ppl dataset under every --protocols protocol on
    --max-windows windows for every row, then the --ppl-extra cells. A column is named by its protocol;
    an extra cell whose dataset and protocol a main cell already has is named `PROTOCOL@WINDOWS`; one that
    repeats a cell (dataset, protocol and windows) adds its budgets to that cell's."""
    cells = [PPLCell(d, p, max_windows, None, p) for d in ppl for p in protocols]
    for cell in extra:
        same = [c for c in cells if (c.dataset, c.protocol) == (cell.dataset, cell.protocol)]
        twin = next((i for i, c in enumerate(cells) if c in same and c.max_windows == cell.max_windows), None)
        if twin is not None:  # measured already: for the budgets of both specs
            old = cells[twin]
            budgets = None if old.budgets is None or cell.budgets is None else tuple(dict.fromkeys(old.budgets + cell.budgets))
            cells[twin] = PPLCell(old.dataset, old.protocol, old.max_windows, budgets, old.column)
            continue
        column = cell.protocol if not same else f"{cell.protocol}@{cell.max_windows or 'all'}"
        cells.append(PPLCell(cell.dataset, cell.protocol, cell.max_windows, cell.budgets, column))
    return cells


def zero_shot_average(tasks: list) -> tuple[float | None, float | None]:
    """The mean of the tasks' reported accuracies and its standard error sqrt(sum SE_i^2) / n, the tasks
    taken as independent (each SE_i is lm-eval's standard error of that task's mean accuracy). None
    unless every task has a value (and, for the SE, a standard error)."""
    if not tasks or any(t is None or t.get("value") is None for t in tasks):
        return None, None
    avg = sum(t["value"] for t in tasks) / len(tasks)
    ses = [t.get("stderr") for t in tasks]
    se = None if any(x is None for x in ses) else sum(x * x for x in ses) ** 0.5 / len(tasks)
    return avg, se
