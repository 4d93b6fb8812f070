"""`python dms_llm/search.py ...` and `accelerate launch dms_llm/search.py ...`: the `dms-llm search`
command (dms_llm.cli.search), runnable as a script so that Accelerate and torchrun can launch it."""

import sys

from dms_llm.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
