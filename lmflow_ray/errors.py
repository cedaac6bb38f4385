"""User-facing errors.

`UserError` is anything the user can fix (bad data, bad config, missing model): the CLI
prints it as one line and exits with status 2, never with a traceback. Everything else
is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations


class UserError(Exception):
    """One clear line: what is wrong, where, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        # Extra lines (e.g. one per bad instance) printed after the headline.
        self.details = details or []

    def __str__(self) -> str:
        return self.message


class RunInterrupted(UserError):
    """A long run stopped by a failure outside the user's input (a trainer process died): one line naming
    how to continue it, exit status 1."""

    exit_code = 1
