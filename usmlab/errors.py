"""Errors a user can act on.

Everything that should reach the terminal as one line (bad input, missing tools, a busy port)
raises a UsmlabError; the CLI prints its message and exits with its code, never a traceback.
"""


class UsmlabError(Exception):
    """A failure explained in one line, with the exit status the CLI should use."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UsmlabError):
    """The user asked for something malformed (exit 2, like argument errors)."""

    exit_code = 2


class InputError(UsageError):
    """A file given to usmlab is missing, unreadable or malformed; the message names it (exit 2)."""


class RunInterrupted(UsmlabError):
    """Ctrl-C or SIGTERM arrived; the run is stopped and kept as `interrupted`."""

    exit_code = 130
