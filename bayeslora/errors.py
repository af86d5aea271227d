"""The one exception type for bad user input.

Anything a user can get wrong (an unknown task, a malformed file, a bad
hyper-parameter) raises `UsageError` with a one-line message naming the
offending value. The command line turns it into one line on stderr and exit
code 2; library callers get an ordinary `ValueError` subclass.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input, reported as one line naming the problem."""


def check_count(what: str, value: int | None) -> None:
    """A count (questions, samples, members, batch size) must be at least 1; None means not given."""
    if value is not None and value < 1:
        raise UsageError(f"{what} must be at least 1, got {value}")
