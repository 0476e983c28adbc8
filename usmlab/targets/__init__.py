"""Where a run executes; see base.Target for the interface every transport implements."""

from __future__ import annotations

from pathlib import Path

from usmlab.errors import UsageError
from usmlab.targets.base import BackgroundProcess, CommandResult, Target
from usmlab.targets.local import LocalTarget

__all__ = ["BackgroundProcess", "CommandResult", "LocalTarget", "Target", "open_target"]


def default_target_spec(cwd: Path | None = None) -> str:
    """`vagrant` when this folder's lab VM exists, else `local` (targets/vagrant.py)."""
    from usmlab.targets.vagrant import default_target_spec as default

    return default(cwd or Path.cwd())


SPECS_HELP = "use 'local', 'vagrant' or 'ssh://USER@HOST[:PORT]'"


def check_target_spec(spec: str) -> str:
    """The spec, if it names a kind of target at all; a one-line usage error otherwise."""
    if spec not in ("local", "vagrant") and not spec.startswith("ssh://"):
        raise UsageError(f"unknown target {spec!r}: {SPECS_HELP}")
    return spec


def open_target(
    spec: str | None, identity: Path | None = None, work_dir: str | None = None
) -> Target:
    """A target from its command-line spelling: `local`, `vagrant` or `ssh://USER@HOST[:PORT]`;
    None: the default (the lab VM when it exists, else this machine)."""
    spec = spec or default_target_spec()
    if spec == "vagrant":
        from usmlab.targets.vagrant import VagrantTarget

        return VagrantTarget(Path.cwd(), identity, work_dir)
    if spec == "local":
        if identity is not None:
            raise UsageError("--identity goes with an ssh:// target, not local")
        return LocalTarget(Path(work_dir) if work_dir else None)
    if spec.startswith("ssh://"):
        from usmlab.targets.ssh import SshTarget  # fabric loads only when SSH is used

        return SshTarget(spec, identity=identity, work_dir=work_dir)
    raise UsageError(f"unknown target {spec!r}: {SPECS_HELP}")
