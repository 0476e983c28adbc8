"""`usmlab init|up|status|ssh|halt|destroy`: the lab VM's lifecycle (usmlab/vm/)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from usmlab.commands import JsonOption, TerminalReporter, friendly, say
from usmlab.errors import UsageError


@friendly
def init_cmd(
    force: Annotated[bool, typer.Option(help="Overwrite an existing usmlab.toml.")] = False,
) -> None:
    """Write a usmlab.toml with the VM's settings and their defaults, to edit."""
    from usmlab.vm.settings import write_default_toml

    print(f"wrote {write_default_toml(Path.cwd() / 'usmlab.toml', force=force)}")


def _vm_settings(**flags: Any) -> Any:
    from usmlab.vm.settings import load_settings

    return load_settings(Path.cwd(), os.environ, {k: v for k, v in flags.items() if v is not None})


@friendly
def up_cmd(
    provider: Annotated[str | None, typer.Option(help="libvirt, qemu, vmware_desktop, ...")] = None,
    box: Annotated[str | None, typer.Option(help="Vagrant box (bento/ubuntu-24.04).")] = None,
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs.")] = None,
    memory: Annotated[int | None, typer.Option(help="Memory in MB.")] = None,
    agent_path: Annotated[
        str | None, typer.Option(help="Local datadog-agent checkout, synced to /git/...")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="full, or test (skips the heavy toolchain).")
    ] = None,
    lab: Annotated[
        bool,
        typer.Option(help="This machine's local test VM: a small Debian box, libvirt under TCG."),
    ] = False,
    arch: Annotated[
        str | None,
        typer.Option(help="arm64 or amd64. Default: the box's (arm64); with --lab this machine's."),
    ] = None,
) -> None:
    """Create, start and provision the lab VM (quick when it is already up)."""
    from usmlab.arch import require_arch
    from usmlab.vm import vagrant

    arch = require_arch(arch, "--arch").go if arch else None
    reporter = TerminalReporter()

    overrides: dict[str, Any] = {
        "provider": provider, "box": box, "cpus": cpus, "memory": memory,
        "agent_path": agent_path, "profile": profile,
    }  # fmt: skip
    kept = vagrant.remembered(Path.cwd())
    if kept is not None:
        # The VM exists: its settings stick; a flag that would change one is refused.
        given = {k: v for k, v in overrides.items() if v is not None}
        changed = [f"{k}={v!r} (it has {getattr(kept, k)!r})" for k, v in given.items()
                   if getattr(kept, k) != v]  # fmt: skip
        if lab and not kept.lab_mode:
            changed.append("--lab (it is not a lab VM)")
        if arch:
            from usmlab.vm.box import host_debian_arch

            has = (kept.lab_arch or host_debian_arch()) if kept.lab_mode else kept.box_architecture
            if arch != has:
                changed.append(f"--arch {arch} (it is {has})")
        if changed:
            raise UsageError(
                f"the lab VM exists with other settings: {', '.join(changed)}; "
                "`usmlab destroy` first to make it again with them"
            )
        if kept.lab_mode:
            from usmlab.vm.libvirt_host import ensure_libvirt_daemons

            ensure_libvirt_daemons(say)
        result = vagrant.up(Path.cwd(), kept, progress=reporter, cwd=Path.cwd())
        print(f"VM {result.action} in {result.seconds:.1f} s (its settings kept)")
        return
    if lab:
        from usmlab.vm.box import build_test_box, require_emulator
        from usmlab.vm.libvirt_host import ensure_libvirt_daemons

        require_emulator(arch)
        ensure_libvirt_daemons(say)
        given = {k: v for k, v in overrides.items() if v is not None}
        test_box = build_test_box(progress=reporter, arch=arch)
        overrides = {**test_box.lab_settings(), "profile": "test", **given}
    elif arch:
        overrides["box_architecture"] = arch
    settings = _vm_settings(**overrides)
    for line in settings.describe():
        say(f"[vm] {line}")
    result = vagrant.up(Path.cwd(), settings, progress=reporter, cwd=Path.cwd())
    print(f"VM {result.action} in {result.seconds:.1f} s; `usmlab test scenario1` now runs there")


@friendly
def status_cmd(as_json: JsonOption = False) -> None:
    """The lab VM's state (running, poweroff, not_created, ...)."""
    from usmlab.vm import vagrant

    state = vagrant.status(Path.cwd())
    print(json.dumps({"state": state}) if as_json else state)


@friendly
def ssh_cmd(
    command: Annotated[list[str] | None, typer.Argument(help="Run this, not a shell.")] = None,
) -> None:
    """Open a shell in the lab VM (plain OpenSSH with Vagrant's details)."""
    from usmlab.vm import vagrant

    details = vagrant.ssh_details(Path.cwd())
    argv = [
        "ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-i", str(details["identity_file"]), "-p", str(details["port"]),
        f"{details['user']}@{details['host']}", *(command or []),
    ]  # fmt: skip
    os.execvp("ssh", argv)


@friendly
def halt_cmd() -> None:
    """Stop the lab VM (keeps it)."""
    from usmlab.vm import vagrant

    vagrant.halt(Path.cwd(), progress=say)


@friendly
def destroy_cmd() -> None:
    """Delete the lab VM (the box stays cached)."""
    from usmlab.vm import vagrant

    vagrant.destroy(Path.cwd(), progress=say)
