"""Runs that write a folder, below the commands and the benchmark: one configuration system (each run's
dataclass is at once its options, its recipe format and its record), the search and fine-tuning runs,
and the run folders they share. `dms-llm search` / `finetune` read a command line into these configs;
the benchmark runs the same `run` functions on the recipes it writes (`run_command`)."""


def run_command(name: str, values: dict, config_path: str) -> None:
    """`dms-llm NAME --config CONFIG_PATH` in-process, with `values` written as that recipe: the recipe is read
    back as the command reads it and its `run` (`dms_llm.runs`) writes the folder, which records that command."""
    import shlex

    import yaml

    from ..errors import ActionableError
    from ..files import write_text_atomic
    from . import finetune, search
    from .options import load_recipe, make

    cls, run = {"search": (search.SearchConfig, search.run), "finetune": (finetune.FinetuneConfig, finetune.run)}[name]
    write_text_atomic(config_path, yaml.safe_dump(values, sort_keys=True))
    command = f"dms-llm {name} " + shlex.join(["--config", config_path])  # as `dms-llm` records its own argv
    if not run(make(cls, load_recipe(config_path, cls)), command).get("finished"):
        raise ActionableError(f"`{command}` stopped before the end (it is resumable)")
