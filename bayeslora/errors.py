"""The exception types for bad user input and bad saved files.

Anything a user can get wrong (an unknown task, a malformed file, a bad
hyper-parameter, a damaged adapter folder) raises a `UsageError` with a
one-line message naming the offending value or file. The command line turns
it into one line on stderr and exit code 2; library callers get an ordinary
`ValueError` subclass (`MissingFileError` is also a `FileNotFoundError`).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input, reported as one line naming the problem."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class CorruptFileError(UsageError):
    """A saved file cannot be read, or does not hold what the code expects (schema, tensors, values)."""


class OutputInUseError(UsageError):
    """Another bayeslora process is writing into the same output folder."""


def check_count(what: str, value: int | None) -> None:
    """A count (questions, samples, members, batch size) must be at least 1; None means not given."""
    if value is not None and value < 1:
        raise UsageError(f"{what} must be at least 1, got {value}")
