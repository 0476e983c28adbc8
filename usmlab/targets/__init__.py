"""Where a run executes; see base.Target for the interface every transport implements."""

from __future__ import annotations

from pathlib import Path

from usmlab.errors import UsageError
from usmlab.targets.base import BackgroundProcess, CommandResult, Target
from usmlab.targets.local import LocalTarget

__all__ = ["BackgroundProcess", "CommandResult", "LocalTarget", "Target", "open_target"]


def open_target(spec: str, identity: Path | None = None, work_dir: str | None = None) -> Target:
    """A target from its command-line spelling: `local` or `ssh://USER@HOST[:PORT]`."""
    if spec == "local":
        if identity is not None:
            raise UsageError("--identity goes with an ssh:// target, not local")
        return LocalTarget(Path(work_dir) if work_dir else None)
    if spec.startswith("ssh://"):
        from usmlab.targets.ssh import SshTarget  # fabric loads only when SSH is used

        return SshTarget(spec, identity=identity, work_dir=work_dir)
    raise UsageError(f"unknown target {spec!r}: use 'local' or 'ssh://USER@HOST[:PORT]'")
