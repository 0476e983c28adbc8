"""Where a run executes; see base.Target for the interface every transport implements."""

from __future__ import annotations

from pathlib import Path

from usmlab.errors import UsageError
from usmlab.targets.base import BackgroundProcess, CommandResult, Target
from usmlab.targets.local import LocalTarget

__all__ = ["BackgroundProcess", "CommandResult", "LocalTarget", "Target", "open_target"]


def default_target_spec(cwd: Path | None = None) -> str:
    """`vagrant` when this folder's lab VM exists, else `local`."""
    from usmlab.vm.vagrant import vm_exists

    return "vagrant" if vm_exists(cwd or Path.cwd()) else "local"


SPECS_HELP = "use 'local', 'vagrant' or 'ssh://USER@HOST[:PORT]'"


def check_target_spec(spec: str) -> str:
    """The spec, if it names a kind of target at all; a one-line usage error otherwise."""
    if spec not in ("local", "vagrant") and not spec.startswith("ssh://"):
        raise UsageError(f"unknown target {spec!r}: {SPECS_HELP}")
    return spec


def open_target(spec: str, identity: Path | None = None, work_dir: str | None = None) -> Target:
    """A target from its command-line spelling: `local`, `vagrant` or `ssh://USER@HOST[:PORT]`."""
    if spec == "vagrant":
        from usmlab.targets.ssh import SshTarget
        from usmlab.vm.vagrant import ssh_details, vm_exists

        if not vm_exists(Path.cwd()):
            raise UsageError("no lab VM in this folder: run `usmlab up` first")
        details = ssh_details(Path.cwd())
        key = identity or Path(str(details["identity_file"]))
        target = SshTarget(
            f"ssh://{details['user']}@{details['host']}:{details['port']}", key, work_dir
        )
        target.kind = "vagrant"
        target.spec = "vagrant"
        return target
    if spec == "local":
        if identity is not None:
            raise UsageError("--identity goes with an ssh:// target, not local")
        return LocalTarget(Path(work_dir) if work_dir else None)
    if spec.startswith("ssh://"):
        from usmlab.targets.ssh import SshTarget  # fabric loads only when SSH is used

        return SshTarget(spec, identity=identity, work_dir=work_dir)
    raise UsageError(f"unknown target {spec!r}: {SPECS_HELP}")
