"""The failure a user can act on that is neither bad input (ValueError) nor a file, folder or network problem
(OSError): a push the Hub refused, llama.cpp failing to quantize, a checkpoint made by another run. Its
message says what to do, so the commands print it as one line; any other RuntimeError (a shape mismatch,
out of memory, a broken invariant) is a bug or a resource limit and keeps its traceback."""


class ActionableError(RuntimeError):
    """A RuntimeError whose message tells the user what to change; the commands report it in one line."""
