"""The `dms-llm` command: subcommands dispatch to their modules; bad use is one line and exit 2."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dms_llm.runs.options import exit_code
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
    from dms_llm.runs.options import parse_config
    from dms_llm.runs.search import SearchConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"target-ratio: 0.5\noutput-dir: {tmp_path / 'out'}\ndistill: true\ngradient-checkpointing: true\n")
    on = parse_config(SearchConfig, ["--config", str(recipe)], "search")
    assert on.distill and on.gradient_checkpointing
    off = parse_config(SearchConfig, ["--config", str(recipe), "--no-distill", "--no-eval"], "search")
    assert not off.distill and off.gradient_checkpointing and off.no_eval


def test_search_importance_option_reaches_the_method_and_refuses_unknown_modes(tmp_path):
    from dms_llm.runs.options import ConfigError, parse_config
    from dms_llm.runs.search import SearchConfig

    base = ["--target-ratio", "0.8", "--output-dir", str(tmp_path / "out")]
    assert parse_config(SearchConfig, base, "search").method().importance == "block"
    assert parse_config(SearchConfig, base + ["--importance", "token"], "search").method().importance == "token"
    with pytest.raises(ConfigError, match="importance must be one of block, token"):
        parse_config(SearchConfig, base + ["--importance", "tokens"], "search")


def test_an_unquoted_yaml_no_is_refused_with_the_quoting_that_keeps_it(tmp_path):
    from dms_llm.runs.finetune import FinetuneConfig
    from dms_llm.runs.options import ConfigError, parse_config

    recipe = tmp_path / "r.yaml"
    base = ["--config", str(recipe), "--model", "m", "--output-dir", str(tmp_path / "out")]
    recipe.write_text("mixed-precision: no\n")  # YAML 1.1: the boolean False
    with pytest.raises(ConfigError, match=r'mixed-precision: expected str, got False \(YAML reads an unquoted no or off .*mixed-precision: "no"'):
        parse_config(FinetuneConfig, base, "finetune")
    recipe.write_text("mixed-precision: yes\n")
    with pytest.raises(ConfigError, match=r'got True \(YAML reads an unquoted yes or on .*mixed-precision: "yes"'):
        parse_config(FinetuneConfig, base, "finetune")
    recipe.write_text('mixed-precision: "no"\n')
    assert parse_config(FinetuneConfig, base, "finetune").mixed_precision == "no"


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


# ----- one configuration system -------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _config_class(path: Path):
    from dms_llm.cli.benchmark import BenchmarkConfig
    from dms_llm.runs.finetune import FinetuneConfig
    from dms_llm.runs.search import SearchConfig

    return {"benchmark": (BenchmarkConfig, {}), "finetune": (FinetuneConfig, {"model": "p", "output_dir": "o"})}.get(
        path.parent.name, (SearchConfig, {"output_dir": "o"}))


def test_every_recipe_loads_through_its_command(monkeypatch):
    """Every recipe under recipes/ (but Accelerate's launch configs) is read by its command's config, each
    value reaching the config unchanged, and the command line reads the same config from it."""
    from dms_llm.runs.options import load_recipe, make, parse_config, record

    monkeypatch.chdir(REPO)  # the benchmark preset names its search and recovery recipes relative to the root
    found = sorted(p for p in REPO.glob("recipes/**/*.yaml") if "accelerate" not in p.parts)
    assert len(found) >= 11
    for path in found:
        cls, required = _config_class(path)
        values = load_recipe(str(path), cls)
        cfg = make(cls, required | values)
        assert {k: record(cfg)[k] for k in values} == values, path  # every value reaches the run unchanged
        argv = ["--config", str(path)] + [a for k, v in required.items() for a in (f"--{k.replace('_', '-')}", v)]
        assert parse_config(cls, argv, "") == cfg, path
    from dms_llm.cli.search import parse_config as search_config

    cfg = search_config(["--config", "recipes/smollm2-135m-80.yaml", "--target-params", "1e6", "--output-dir", "o"])
    assert cfg.target_params == 1_000_000 and cfg.target_ratio is None  # the command line's budget replaces the recipe's


def test_search_options_are_the_method_fields_without_a_mapping():
    """Each scalar DMSConfig field is a search option (its default the library's) that reaches the method as given."""
    from dms_llm.runs.options import options
    from dms_llm.cli.search import parse_config
    from dms_llm.runs.search import SearchConfig
    from dms_llm.method import DMSConfig

    offered = {o.field: o.default for o in options(SearchConfig)}
    for f in dataclasses.fields(DMSConfig):
        if f.name not in ("temperature", "min_kept"):  # per-kind records: the API's, not options
            assert offered[f.name] == f.default, f.name
    cfg = parse_config(["--target-ratio", "0.8", "--output-dir", "o", "--ema-decay", "0.9", "--prune", "channels,heads",
                        "--steps", "7", "--no-fit-budget", "--batch-size", "3"])
    method = cfg.method()
    assert (method.ema_decay, method.structures, method.steps, method.fit_budget) == (0.9, ("heads", "channels"), 7, False)
    assert method.target_ratio is None and cfg.run_settings().batch_size == 3  # the budget goes beside the method


def test_an_option_without_help_text_is_refused():
    """A field added to the library's settings is offered only once documented: --help cannot show a bare name."""
    from dms_llm.runs.options import options
    from dms_llm.runs.search import SearchConfig

    @dataclasses.dataclass
    class WithNewSetting(SearchConfig):
        new_knob: int = 3

    with pytest.raises(TypeError, match="new_knob"):
        options(WithNewSetting)


def test_an_old_spelling_still_works_with_a_warning(tmp_path, capsys):
    from dms_llm.cli import benchmark

    new = benchmark.parse_args(["--protocol", "sparsegpt", "--output-dir", "x"])
    assert "warning" not in capsys.readouterr().err
    old = benchmark.parse_args(["--protocols", "sparsegpt", "--out", "x"])
    err = capsys.readouterr().err
    assert "--protocols is deprecated; use --protocol" in err and "--out is deprecated; use --output-dir" in err
    assert old.protocols == new.protocols == ["sparsegpt"] and old.out == new.out == "x"
    recipe = tmp_path / "bench.yaml"
    recipe.write_text("protocols: sparsegpt\n")
    assert benchmark.parse_args(["--config", str(recipe)]).protocols == ["sparsegpt"]
    assert "protocols is deprecated; use protocol" in capsys.readouterr().err


def test_limit_is_a_count_or_a_fraction_in_every_command():
    from dms_llm.cli import benchmark, run_eval, search

    base = ["--target-ratio", "0.8", "--output-dir", "o"]
    assert search.parse_config(base + ["--eval-limit", "0.5"]).eval_limit == 0.5
    assert search.parse_config(base + ["--eval-limit", "20"]).eval_limit == 20
    assert run_eval.parse_args(["m", "--limit", "0.5"]).limit == 0.5 and benchmark.parse_args(["--limit", "20"]).limit == 20


def test_one_resume_check_names_every_changed_setting(tmp_path):
    """One rule for search and finetune: the settings in the config's RESUME must equal the run's record; a
    record that predates a setting had the value that reproduces it (align 1: exact widths)."""
    from dms_llm.runs.options import ConfigError, record
    from dms_llm.runs.folder import check_resume
    from dms_llm.cli.search import parse_config

    cfg = parse_config(["--target-ratio", "0.8", "--output-dir", str(tmp_path), "--resume"])
    saved = {k: v for k, v in record(cfg).items() if k != "align"} | {"seed": 3}
    (tmp_path / "search_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"--seed 3 \(now 0\), --align 1 \(now 32\)"):
        check_resume(cfg, str(tmp_path), "search_config.json")
    (tmp_path / "search_config.json").write_text(json.dumps(record(cfg) | {"eval_ppl": "ptb"}))
    check_resume(cfg, str(tmp_path), "search_config.json")  # the evaluation is not part of the checkpoint
