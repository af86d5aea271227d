"""The one exception type for bad user input.

Anything a user can get wrong (an unknown task, a malformed file, a bad
hyper-parameter) raises `UsageError` with a one-line message naming the
offending value. The command line turns it into one line on stderr and exit
code 2; library callers get an ordinary `ValueError` subclass.
"""


class UsageError(ValueError):
    """Bad user input, reported as one line naming the problem."""
