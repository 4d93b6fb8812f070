"""What every dms_llm command shares: a dataclass that is at once the CLI schema and the recipe format,
YAML recipes that the command line overrides, bad input reported as one line instead of a traceback, and
the default data folder (the library takes it as an argument; only the commands know the repository).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import MISSING, field

from ..errors import ActionableError

class ConfigError(ValueError):
    """Bad options or inputs, reported before any compute as one line (no traceback)."""


def option(default, help):
    """A config field with its help text (shown by --help and kept with the field)."""
    return field(default=default, metadata={"help": help})


def _kind(f):
    name = str(f.type).split(" ")[0]
    return {"int": int, "float": float, "bool": bool}.get(name, str)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (unless it is None or False, or the text already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _help(f) -> str:
    """The field's help text and its default (the parser's own defaults are None: 'not given')."""
    if f.default is MISSING or f.default is None or f.default is False or f.default == "":
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {str(f.default).replace('%', '%%')})"


def build_parser(config_cls, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="YAML recipe whose keys are these option names (the command line overrides it)")
    inherited = {f.name for base in config_cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    for f in sorted(dataclasses.fields(config_cls), key=lambda f: f.name in inherited):  # the command's own first
        flag = "--" + f.name.replace("_", "-")
        if _kind(f) is bool:
            # --X / --no-X, so that the command line can turn off what a recipe turns on; a switch that is
            # itself a negation (--no-eval) stays one flag (argparse would read it as the negative form)
            action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=_kind(f), default=None, help=_help(f))
    return parser


def load_recipe(path: str, config_cls) -> dict:
    """Recipe keys are option names (`target-ratio` or `target_ratio`); an unknown key is an error."""
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
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {}
    for key, value in recipe.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}; valid keys are the command's options (see --help)")
        if _kind(fields[name]) is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 5.47e9 and 2e-4 as strings
            except ValueError:
                raise ConfigError(f"{path}: {key}: not a number: {value!r}") from None
        expected = _kind(fields[name])
        if value is not None and expected is not str and not isinstance(value, expected):
            if not (expected is float and isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(f"{path}: {key}: expected {expected.__name__}, got {value!r}")
        values[name] = value
    return values


def parse_config(config_cls, argv, description: str, exclusive=(), prog: str | None = None):
    """Recipe values, overridden by the command line. For each group in `exclusive` (options of which
    exactly one is given, like a budget or a length), a command-line value replaces the whole group."""
    args = vars(build_parser(config_cls, description, prog).parse_args(argv))
    path = args.pop("config", None)
    recipe = load_recipe(path, config_cls) if path else {}
    for group in exclusive:
        if any(args.get(name) is not None for name in group):
            for name in group:
                recipe.pop(name, None)
    return config_cls(**{**recipe, **{k: v for k, v in args.items() if v is not None}})


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
