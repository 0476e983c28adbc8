"""Errors a user can act on.

Everything that should reach the terminal as one line (bad input, missing tools, a busy port)
raises a UsmlabError; the CLI prints its message and exits with its code, never a traceback.
"""

# Exit statuses (README, "Exit status"): 1 is reserved for "misattribution found", so a run that
# did not measure what it claims can never be mistaken for a finding.
EXIT_CLEAN = 0
EXIT_MISATTRIBUTION = 1
EXIT_USAGE = 2
EXIT_NO_CAPTURES = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130
EXIT_READER_GONE = 141  # stdout was a pipe whose reader went away (`usmlab runs | head`)


class UsmlabError(Exception):
    """A failure explained in one line, with the exit status the CLI should use."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UsmlabError):
    """The user asked for something malformed (exit 2, like argument errors)."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """A file given to usmlab is missing, unreadable or malformed; the message names it (exit 2)."""


class RunInterrupted(UsmlabError):
    """Ctrl-C or SIGTERM arrived; the run is stopped and kept as `interrupted`."""

    exit_code = EXIT_INTERRUPTED
