"""The commands (`dms-llm SUBCOMMAND`) and what they share: options that are at once the CLI schema and
the recipe format, run folders, evaluation after a run, reports."""
