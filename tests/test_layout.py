"""The package's shape: every import inside dms_llm names a module of this checkout, the imports form
no cycle, no module is over 500 lines, and the package reaches nothing outside itself."""

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dms_llm"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every dms_llm module `name` imports, at module level or inside a function (`from a import b` counts
    as importing the module a.b when that is one, else a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t == "dms_llm" or t.startswith("dms_llm.")}


def test_every_import_names_a_module_of_this_package():
    modules = _modules()
    for name, path in modules.items():
        missing = _imports(name, path, modules) - set(modules)
        assert not missing, f"{name} imports {sorted(missing)}, which are not modules of {PACKAGE}"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_package_reaches_nothing_outside_itself():
    """No sys.path edits, no file loaded by path from the repository, no ../shared default in library code
    (the commands resolve the data folder: runs/options.py)."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(PACKAGE))
        assert "sys.path" not in text, rel
        assert "spec_from_file_location" not in text, rel
        if rel != os.path.join("runs", "options.py"):
            assert '"shared"' not in text and "'shared'" not in text, rel


def test_imported_modules_come_from_this_checkout():
    import importlib
    import pkgutil

    import dms_llm

    assert Path(dms_llm.__file__).resolve().parent == PACKAGE
    for info in pkgutil.walk_packages(dms_llm.__path__, "dms_llm."):
        if info.name.startswith("dms_llm.export.llamacpp"):
            continue  # needs the optional llama-cpp-python
        module = importlib.import_module(info.name)
        assert Path(module.__file__).resolve().is_relative_to(PACKAGE), info.name
