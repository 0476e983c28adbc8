"""The lab VM as a target: SSH with the details `vagrant ssh-config` gives (docs/vm.md).

Its runs are named `vagrant` (not the forwarded port on 127.0.0.1), and every verb takes it as
its default target when the VM exists (`default_target_spec`).
"""

from __future__ import annotations

from pathlib import Path

from usmlab.errors import UsageError
from usmlab.targets.ssh import SshTarget


class VagrantTarget(SshTarget):
    kind = "vagrant"

    def __init__(self, root: Path, identity: Path | None = None, work_dir: str | None = None):
        from usmlab.vm.vagrant import ssh_details, vm_exists

        if not vm_exists(root):
            raise UsageError("no lab VM in this folder: run `usmlab up` first")
        details = ssh_details(root)
        key = identity or Path(str(details["identity_file"]))
        super().__init__(
            f"ssh://{details['user']}@{details['host']}:{details['port']}", key, work_dir
        )
        self.spec = "vagrant"

    @property
    def label(self) -> str:
        return "vagrant"


def default_target_spec(cwd: Path) -> str:
    """`vagrant` when this folder's lab VM exists, else `local`; a VM that .usmlab/ records but
    that is gone is a one-line error, not a silent run on this machine."""
    from usmlab.vm.vagrant import STATE_DIR, vm_exists

    if vm_exists(cwd):
        return "vagrant"
    if (cwd / STATE_DIR / "vm.json").exists():
        raise UsageError(
            "the lab VM recorded in .usmlab/ is gone: `usmlab up` to make it again, or "
            "--target local to run on this machine"
        )
    return "local"
