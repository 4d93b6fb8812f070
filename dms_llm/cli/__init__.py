"""The commands (`dms-llm SUBCOMMAND`): each reads its command line (and `--config` recipe) into its
config dataclass and runs it. The configuration system, the search and fine-tuning runs and their run
folders live one layer down, in `dms_llm.runs`, where the benchmark runs them too."""
