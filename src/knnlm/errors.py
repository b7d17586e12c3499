"""User-facing errors: one line naming the file or flag and the fix."""


class KnnlmError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""
