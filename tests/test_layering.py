"""The package's layers (docs/DESIGN.md, "Layers and modules"): every module imports only from its own layer
and the layers below it. Imports are read from the source (`ast`, function-level imports included: a lazy
import is still a dependency), so the test needs nothing installed and sees what a reader sees.

The map is explicit: a new module without a layer fails the test until it is given one."""

from pathlib import Path

import pytest
from test_layout import _imports, _modules

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS = [
    # what everything may use: no torch model code of the method, no I/O beyond files and the Hub
    ("base", ["dms_llm.errors", "dms_llm.files", "dms_llm.markdown", "dms_llm.hub", "dms_llm.modeling",
              # the data-folder rule; standalone (lm-eval loads tasks/utils.py by path), so data/ may use it
              "dms_llm.evaluation.tasks"]),
    # the method: masks, budget, plan, pruning, and the passes over calibration blocks they need
    ("core", ["dms_llm.arch", "dms_llm.method", "dms_llm.dtopk", "dms_llm.budget", "dms_llm.plan", "dms_llm.provenance", "dms_llm.masks",
              "dms_llm.inject", "dms_llm.prune", "dms_llm.passes", "dms_llm.refit", "dms_llm.streamed"]),
    # what turns a model into a plan (or trains its weights): the DMS search, recovery, the one-shot baselines
    ("training", ["dms_llm.training", "dms_llm.baselines"]),
    # measuring a model in memory; reading text
    ("evaluation", ["dms_llm.evaluation", "dms_llm.data"]),
    # files in and out: checkpoints (whose card shows evaluation results), inference-engine formats
    ("files", ["dms_llm.checkpoints", "dms_llm.export"]),
    # the public API: `import dms_llm` (prepare, search, convert, save_pruned, load_calibration, ...)
    ("api", ["dms_llm"]),
    # runs that write a folder (search, fine-tuning) and the one configuration system their recipes and the
    # commands' options are read by: on the API, below the benchmark, which runs them on its recipes
    ("runs", ["dms_llm.runs"]),
    # the benchmark: built on the API, below the commands (`dms-llm benchmark` is one of them)
    ("benchmark", ["dms_llm.benchmark"]),
    # the commands and their scripts
    ("commands", ["dms_llm.cli", "dms_llm.commands", "dms_llm.search", "dms_llm.finetune"]),
]

# Imports that break the layering today, each with why it is still there. The test fails when one of them
# is gone (remove it here) as well as when a new one appears, so the list only shrinks.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def layer_of(module: str, layers=LAYERS) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    if best is None:
        raise KeyError(f"{module} has no layer: add it to LAYERS in {__file__}")
    return best[0]


def violations(graph: dict[str, set[str]], layers=LAYERS) -> list[tuple[str, str]]:
    """(importer, imported) for every import of a module from a higher layer, sorted."""
    found = []
    for module, imported in graph.items():
        mine = layer_of(module, layers)
        found += [(module, target) for target in imported if layer_of(target, layers) > mine]
    return sorted(found)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) - {name} for name, path in modules.items()}


def _describe(pairs, layers=LAYERS) -> str:
    return "\n".join(f"  {a} ({layers[layer_of(a, layers)][0]}) imports {b} ({layers[layer_of(b, layers)][0]})"
                     for a, b in pairs)


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_imports_go_down_the_layers():
    found = set(violations(_graph()))
    new = sorted(found - set(KNOWN_VIOLATIONS))
    gone = sorted(set(KNOWN_VIOLATIONS) - found)
    assert not new, "imports from a higher layer (docs/DESIGN.md, Layers and modules):\n" + _describe(new)
    assert not gone, f"no longer violations, remove them from KNOWN_VIOLATIONS: {gone}"


def test_the_picture_in_design_md_is_this_map():
    """docs/DESIGN.md draws the layers top to bottom; its picture names the layers of LAYERS in that order,
    and every package of a layer on that layer's line."""
    design = (Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md").read_text()
    picture = design.split("## Layers and modules", 1)[1].split("```", 2)[1]
    lines = [line.strip() for line in picture.splitlines() if line.strip() and line.strip() != "^"]
    drawn = [line.split()[0] for line in lines if line.startswith(tuple(name for name, _ in LAYERS))]
    assert drawn == [name for name, _ in reversed(LAYERS)], drawn
    for name, prefixes in LAYERS:
        start = next(i for i, line in enumerate(lines) if line.split()[0] == name)
        text = " ".join(lines[start:start + 2])  # a layer may take two lines
        for prefix in prefixes:
            short = prefix.removeprefix("dms_llm.").replace(".", "/")
            assert short in text or prefix == "dms_llm", (name, prefix, text)


# ----- the check itself can fail -----------------------------------------------------------------------------

TOY = [("low", ["pkg.low"]), ("mid", ["pkg.mid"]), ("top", ["pkg", "pkg.top"])]


def test_an_upward_import_is_found_at_any_depth():
    graph = {"pkg.low.a": {"pkg.low.b"}, "pkg.low.b": set(), "pkg.mid": {"pkg.low.a"},
             # a function-level import of the top from the bottom, three layers apart
             "pkg.low.deep.c": {"pkg.top.cli"}, "pkg.top.cli": {"pkg.mid", "pkg.low.a"}, "pkg": {"pkg.top.cli"}}
    assert violations(graph, TOY) == [("pkg.low.deep.c", "pkg.top.cli")]


def test_a_sideways_import_within_a_layer_is_allowed_and_the_package_facade_sits_on_top():
    # `pkg` alone is the top layer (it re-exports everything); `pkg.mid` is not under it by prefix length
    assert layer_of("pkg", TOY) == 2 and layer_of("pkg.mid.x", TOY) == 1
    assert violations({"pkg.mid.x": {"pkg.mid.y"}, "pkg.mid.y": set()}, TOY) == []
    assert violations({"pkg.mid.x": {"pkg"}}, TOY) == [("pkg.mid.x", "pkg")]


def test_a_module_outside_the_map_is_an_error():
    with pytest.raises(KeyError, match="has no layer"):
        violations({"other.module": set()}, TOY)


def test_the_real_import_reader_sees_function_level_imports(tmp_path):
    """The reader the layering test uses finds an import inside a function body, relative or absolute."""
    source = tmp_path / "dms_llm" / "core.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from .cli import main\n    import dms_llm.benchmark.rows\n")
    modules = {"dms_llm.core": source, "dms_llm.cli": source, "dms_llm.benchmark.rows": source}
    assert _imports("dms_llm.core", source, modules) == {"dms_llm.cli", "dms_llm.benchmark.rows"}
