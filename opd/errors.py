"""The error that ends a run with one clear line (no traceback)."""


class RunError(Exception):
    """A problem that ends the run with one clear line; train.py prints it after `error:`."""
