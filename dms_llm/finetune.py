"""`python dms_llm/finetune.py ...` and `accelerate launch dms_llm/finetune.py ...`: the `dms-llm finetune`
command (dms_llm.cli.finetune), runnable as a script so that Accelerate and torchrun can launch it."""

import sys

from dms_llm.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
