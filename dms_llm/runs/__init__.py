"""Runs that write a folder, below the commands and the benchmark: one configuration system (each run's
dataclass is at once its options, its recipe format and its record), the search and fine-tuning runs,
and the run folders they share. `dms-llm search` / `finetune` read a command line into these configs;
the benchmark runs the same `run` functions on the recipes it writes."""
