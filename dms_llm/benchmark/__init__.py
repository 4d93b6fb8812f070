"""The side-by-side benchmark (`dms-llm benchmark`): dense, the one-shot baselines and DMS at equal
parameter budgets, each row cached, evaluated and timed the same way."""
