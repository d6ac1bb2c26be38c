"""User-facing errors.

Anything the user can fix (a bad file, a wrong option) raises `FastnefesError` with a one-line
message naming the file / line / value and what was expected. The CLI prints that line and
exits with code 2, without a traceback.
"""


class FastnefesError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit code 2."""
