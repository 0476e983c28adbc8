"""The one error the analysis raises: a missing or corrupt input, said in one line."""

from usmlab.errors import UsageError


class AnalysisError(UsageError):
    """An input file is missing, unreadable or malformed; the message names it (exit 2)."""
