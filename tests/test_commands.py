"""The `dms-llm` command: subcommands dispatch to their modules; bad use is one line and exit 2."""

import subprocess
import sys

import pytest

from dms_llm.cli.options import exit_code
from dms_llm.commands import SUBCOMMANDS, main
from dms_llm.errors import ActionableError


def test_overview_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    assert main([]) == 2  # no subcommand: the overview, as an error


def test_unknown_subcommand_is_one_line_error(capsys):
    assert main(["serch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown subcommand 'serch'")


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "dms_llm.commands", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "subcommands:" in result.stdout


@pytest.mark.parametrize("name, expected", [("search", "(default: 240)"), ("finetune", "(default: 512)"),
                                            ("eval", "(default: llm-pruner)"), ("benchmark", "(default: 128)")])
def test_help_shows_the_defaults(name, expected, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    assert expected in " ".join(capsys.readouterr().out.split())  # argparse wraps the lines


def test_the_command_line_switches_off_what_a_recipe_switches_on(tmp_path):
    from dms_llm.cli.options import parse_config
    from dms_llm.cli.search import SearchConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"target-ratio: 0.5\noutput-dir: {tmp_path / 'out'}\ndistill: true\ngradient-checkpointing: true\n")
    on = parse_config(SearchConfig, ["--config", str(recipe)], "search")
    assert on.distill and on.gradient_checkpointing
    off = parse_config(SearchConfig, ["--config", str(recipe), "--no-distill", "--no-eval"], "search")
    assert not off.distill and off.gradient_checkpointing and off.no_eval


def test_search_importance_option_reaches_the_method_and_refuses_unknown_modes(tmp_path):
    from dms_llm.cli.options import ConfigError, parse_config
    from dms_llm.cli.search import SearchConfig

    base = ["--target-ratio", "0.8", "--output-dir", str(tmp_path / "out")]
    assert parse_config(SearchConfig, base, "search").method().importance == "block"
    assert parse_config(SearchConfig, base + ["--importance", "token"], "search").method().importance == "token"
    with pytest.raises(ConfigError, match="importance must be one of block, token"):
        parse_config(SearchConfig, base + ["--importance", "tokens"], "search")


@pytest.mark.parametrize("error, one_line", [
    (ValueError("bad option"), True), (FileNotFoundError("no such folder"), True),
    (ActionableError("llama.cpp could not quantize"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False), (TypeError("a bug"), False),
])
def test_only_errors_the_user_can_act_on_become_one_line(error, one_line, capsys, monkeypatch):
    monkeypatch.delenv("DMS_DEBUG", raising=False)

    def command():
        raise error

    if one_line:
        assert exit_code(command) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    else:  # a bug or an out-of-memory keeps its traceback
        with pytest.raises(type(error)):
            exit_code(command)
