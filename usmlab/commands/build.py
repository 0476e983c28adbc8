"""`usmlab build`: build usm-debugger with dda on the target."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from usmlab.commands import IdentityOption, TargetOption, friendly, say


@friendly
def build_cmd(
    target: TargetOption = None,
    identity: IdentityOption = None,
    clean: Annotated[bool, typer.Option(help="Remove stale eBPF objects first.")] = False,
    arch: Annotated[str | None, typer.Option(help="arm64 or x86_64 (default: the target's).")] = (
        None
    ),
    agent_dir: Annotated[str, typer.Option(help="The datadog-agent checkout on the target.")] = (
        "/git/datadog-agent"
    ),
    record: Annotated[Path, typer.Option(help="Where the build record goes.")] = Path(
        ".usmlab/build.json"
    ),
) -> None:
    """Build usm-debugger with dda on the target and record the binary's hash."""
    from usmlab.targets import open_target
    from usmlab.tracers.usm_debugger_build import build_usm_debugger, normalize_arch

    if arch is not None:
        arch = normalize_arch(arch)
    lab_target = open_target(target, identity)
    try:
        built = build_usm_debugger(
            lab_target, agent_dir=agent_dir, arch=arch, clean=clean, record_path=record,
            progress=say,
        )  # fmt: skip
    finally:
        lab_target.close()
    print(
        f"built {built.binary} ({built.size} bytes, sha256 {built.sha256[:16]}...) "
        f"in {built.duration_s:.0f} s; record: {record}"
    )
