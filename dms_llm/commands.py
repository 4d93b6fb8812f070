"""`dms-llm`: one command with a subcommand per job.

    dms-llm search --config recipes/smollm2-135m-default.yaml --output-dir runs/default
    dms-llm finetune --model runs/default --output-dir runs/default-recovered
    dms-llm prune --plan runs/default/dms_plan.json --model smollm2-135m --output-dir runs/default-again
    dms-llm export runs/default --to gguf --outtype f16 --output default.gguf
    dms-llm SUBCOMMAND --help

Each subcommand's module is imported only when it runs (transformers alone takes seconds to import).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with a `main(argv) -> int`, one line for the overview)
SUBCOMMANDS = {
    "search": ("dms_llm.cli.search", "search an architecture under a parameter budget, prune, save and evaluate it"),
    "finetune": ("dms_llm.cli.finetune", "recovery fine-tuning (LoRA or full, with distillation) of a pruned checkpoint"),
    "export": ("dms_llm.cli.export", "write a checkpoint in an inference engine's format (GGUF for llama.cpp)"),
    "prune": ("dms_llm.cli.prune", "apply a plan to a checkpoint's files, tensor by tensor (memory: one shard, not the model)"),
    "eval": ("dms_llm.cli.run_eval", "perplexity and zero-shot accuracy of a dense or pruned model"),
    "benchmark": ("dms_llm.cli.benchmark", "baselines and DMS side by side at equal budgets: plans, evaluation, speed, plot"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: dms-llm SUBCOMMAND [options]   (dms-llm SUBCOMMAND --help for its options)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
