"""What every dms_llm command shares: one configuration system, one-line errors, the default data folder.

Each command has one dataclass that is at once its options, its recipe format and its record. It is
composed from the library's own settings by inheritance (`DMSConfig`, `RunSettings`, `RecoveryConfig`),
not restated: every scalar field becomes `--field-name` (a command names a field otherwise in
`OPTION_NAMES`, keeps one out with `HIDDEN`; `HELP` holds the help of fields that the library defines).
A YAML recipe (`--config FILE`) holds the same names; the command line overrides it. An option renamed
for one spelling across commands keeps its old name in `DEPRECATED`: it still works, with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import namedtuple
from dataclasses import MISSING, field

from ..errors import ActionableError


class ConfigError(ValueError):
    """Bad options or inputs, reported before any compute as one line (no traceback)."""


def option(default, help, *, positional: bool = False, choices=None, repeatable: bool = False):
    """A config field with its help text (shown by --help and kept with the field). `repeatable`: a list
    that each use of the option extends (a recipe gives a list, the command line adds to it)."""
    metadata = {"help": help, "positional": positional, "choices": choices, "repeatable": repeatable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def part(config, cls, **overrides):
    """The `cls` (a dataclass that `config` inherits from, e.g. `DMSConfig`) that `config` holds."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.init} | overrides)


# name: in recipes and records (`--` + name with dashes on the command line); kind: int, float, bool, str, tuple
# (a comma list on the command line) or list (repeatable)
Option = namedtuple("Option", "name field kind help default positional choices")


def _kind(f):
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = text.replace(" ", "").split("|")[0]
    if f.metadata.get("repeatable"):
        return list
    if base.startswith(("tuple[str", "list[str")):
        return tuple
    return {"int": int, "float": float, "bool": bool, "str": str}.get(base)  # None: not an option (a nested setting)


def _merged(cls, name: str) -> dict:
    """A class attribute (`HELP`, `OPTION_NAMES`, `DEPRECATED`) merged over the bases, the class's own last."""
    merged = {}
    for base in reversed(cls.__mro__):
        merged.update(vars(base).get(name, {}))
    return merged


def options(cls) -> list[Option]:
    """The command's options, its own fields first (the inherited ones are the library's)."""
    helps, names, hidden = _merged(cls, "HELP"), _merged(cls, "OPTION_NAMES"), set(getattr(cls, "HIDDEN", ()))
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    own = {f.name for f in dataclasses.fields(cls)} - inherited | set(vars(cls).get("__annotations__", {}))
    found = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        kind = _kind(f)
        if kind is None or f.name in hidden or not f.init:
            continue
        text = f.metadata.get("help") or helps.get(f.name)
        if not text:  # a new library setting must be documented before the commands offer it
            raise TypeError(f"{cls.__name__}: option {f.name!r} has no help text (add it to {cls.__name__}.HELP)")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        found.append(Option(names.get(f.name, f.name), f.name, kind, text, default, f.metadata.get("positional", False),
                            f.metadata.get("choices")))
    return found


class _Deprecated(argparse.Action):
    """An option's old spelling: still works, says which one to use."""

    def __call__(self, parser, namespace, values, option_string=None):
        _warn(f"{option_string} is deprecated; use --{self.dest.replace('_', '-')}")
        setattr(namespace, self.dest, values)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _integer(text: str) -> int:
    """An int that may be written as a whole float: --target-params 5.47e9."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


_integer.__name__ = "int"  # argparse names the type in its error message


def build_parser(cls, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of `cls`; every default is None ("not given"), so that a recipe can fill it; --help
    shows the dataclass's defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe whose keys are these option names (the command line overrides it)")
    by_name = {o.name: o for o in options(cls)}
    for o in by_name.values():
        flag = "--" + o.name.replace("_", "-")
        shown = ",".join(o.default) if o.kind is tuple else o.default if o.default not in (None, False, "", []) else None
        text = o.help + (f" (default: {str(shown).replace('%', '%%')})" if shown is not None and "default" not in o.help else "")
        if o.positional:
            parser.add_argument(o.name, nargs="?", metavar=o.name.upper(), default=None, help=text)
        elif o.kind is bool:
            # --X / --no-X, so that the command line can turn off what a recipe turns on; a switch that is
            # itself a negation (--no-eval) stays one flag (argparse would read it as the negative form)
            action = "store_true" if o.name.startswith("no_") else argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=o.name, action=action, default=None, help=o.help)
        elif o.kind is list:
            parser.add_argument(flag, dest=o.name, action="append", default=None, help=text)
        else:
            parser.add_argument(flag, dest=o.name, type={int: _integer, float: float}.get(o.kind, str), default=None,
                                choices=o.choices, help=text)
    for old, new in _merged(cls, "DEPRECATED").items():
        kind = by_name[new].kind
        parser.add_argument("--" + old.replace("_", "-"), dest=new, action=_Deprecated, default=None,
                            type={int: _integer, float: float}.get(kind, str), help=argparse.SUPPRESS)
    return parser


_CONVERT = {int: lambda v: v if isinstance(v, int) else _integer(str(v)), float: lambda v: v if isinstance(v, (int, float)) else float(v),
            str: str, tuple: str}


def _value(o: Option, key, value, where: str):
    """A recipe value as the command line would give it: numbers from YAML's strings (YAML 1.1 reads 5.47e9
    and 2e-4 as text), a list as a comma list (a list for a repeatable option), the type and choices checked."""
    if o.kind is list:
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list) and o.kind in (str, tuple):
        value = ",".join(str(v) for v in value)
    if value is not None:
        try:
            if (not isinstance(value, bool)) if o.kind is bool else isinstance(value, (bool, dict, list)):
                raise ValueError(value)
            value = value if o.kind is bool else _CONVERT[o.kind](value)
        except ValueError:
            # YAML 1.1 reads an unquoted no, off, yes or on as a boolean: name the quoting that keeps the word
            words = ("yes", "on") if value is True else ("no", "off")
            hint = f' (YAML reads an unquoted {" or ".join(words)} as {value}: quote the word, e.g. {key}: "{words[0]}")' \
                if isinstance(value, bool) and o.kind in (str, tuple) else ""
            raise ConfigError(f"{where}: {key}: expected {'str' if o.kind is tuple else o.kind.__name__}, got {value!r}{hint}") from None
    if o.choices and value is not None and value not in o.choices:
        raise ConfigError(f"{where}: {key}: choose from {', '.join(map(str, o.choices))}, got {value!r}")
    return value


def read_values(cls, given: dict, where: str, lenient: bool = False) -> dict:
    """Option values by name from a mapping whose keys are option names (`target-ratio` or `target_ratio`)
    or their deprecated spellings (with a warning); an unknown key is an error, or left out when `lenient`
    (a run's record, which also holds values the run derived)."""
    by_name, deprecated = {o.name: o for o in options(cls)}, _merged(cls, "DEPRECATED")
    values = {}
    for key, value in given.items():
        name = str(key).replace("-", "_")
        if name in deprecated:
            _warn(f"{where}: {key} is deprecated; use {deprecated[name].replace('_', '-')}")
            name = deprecated[name]
        if name not in by_name:
            if lenient:
                continue
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys are the command's options (see --help)")
        values[name] = _value(by_name[name], key, value, where)
    return values


def load_recipe(path: str, cls) -> dict:
    """A recipe's values by option name; an unknown key or a value of the wrong type is an error."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of option names to values")
    return read_values(cls, recipe, path)


def make(cls, values: dict):
    """The config from option values by name (a comma list where the field is a tuple)."""
    split = lambda v: tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str) else v  # noqa: E731
    return cls(**{o.field: split(values[o.name]) if o.kind is tuple else values[o.name] for o in options(cls) if o.name in values})


def record(config) -> dict:
    """The config by option name, as a recipe would hold it: what a run folder records and resumes by."""
    return {o.name: ",".join(getattr(config, o.field)) if o.kind is tuple else getattr(config, o.field) for o in options(type(config))}


def read_options(cls, argv, description: str, prog: str | None = None, exclusive=()) -> tuple[dict, set, str | None]:
    """(option values by name, the names given on the command line, the recipe's path): the recipe's values,
    overridden by the command line's (a repeatable option's add to the recipe's list). For each group in
    `exclusive` (options of which one is given, like a budget or a length) a command-line value replaces the
    whole group."""
    args = vars(build_parser(cls, description, prog).parse_args(argv))
    path = args.pop("config", None)
    recipe, given = load_recipe(path, cls) if path else {}, {k: v for k, v in args.items() if v is not None}
    for group in exclusive:
        if any(name in given for name in group):
            recipe = {k: v for k, v in recipe.items() if k not in group}
    repeatable = {o.name for o in options(cls) if o.kind is list}
    return {**recipe, **{k: recipe.get(k, []) + v if k in repeatable else v for k, v in given.items()}}, set(given), path


def parse_config(cls, argv, description: str, exclusive=(), prog: str | None = None):
    return make(cls, read_options(cls, argv, description, prog, exclusive)[0])


def run_main(run, parse, argv=None) -> int:
    """0 when finished, 3 when stopped early (resumable), 2 with one `error: ...` line on bad input;
    DMS_DEBUG=1 shows the traceback instead."""
    return exit_code(lambda: 0 if run(parse(argv)).get("finished") else 3)


def exit_code(command) -> int:
    """`command()`'s exit code, or 2 after one `error: ...` line for an error the user can act on: bad input
    (ValueError), a missing file or package (OSError, ImportError), or an `ActionableError`. Any other
    exception, a plain RuntimeError included (a shape bug, out of memory), keeps its traceback; so does
    every error with DMS_DEBUG=1."""
    try:
        return command()
    except (ValueError, OSError, ActionableError, ImportError) as e:
        if os.environ.get("DMS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def data_dir_default(data_dir: str | None = None) -> str:
    """`--data-dir`, else `$DMS_DATA_DIR`, else `../shared/data` beside the repository (a checkout's layout):
    the library's rule (`data_dir_path`) with the commands' default."""
    from ..evaluation.tasks.utils import data_dir_path

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return str(data_dir_path(data_dir, default=os.path.join(repo, "..", "shared", "data")))
