"""The one error type library code raises for problems a user can fix."""


class UnifiedError(Exception):
    """Something the user can act on: what was wrong, where (file, field, step) and what was expected.

    The command line prints it as one line and exits non-zero; tracebacks are for bugs only.
    """
