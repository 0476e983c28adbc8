"""Where a run executes; see base.Target for the interface every transport implements."""

from __future__ import annotations

from usmlab.errors import UsageError
from usmlab.targets.base import BackgroundProcess, CommandResult, Target
from usmlab.targets.local import LocalTarget

__all__ = ["BackgroundProcess", "CommandResult", "LocalTarget", "Target", "open_target"]


def open_target(spec: str) -> Target:
    """A target from its command-line spelling: `local` (more transports to come)."""
    if spec == "local":
        return LocalTarget()
    raise UsageError(f"unknown target {spec!r}: use 'local'")
