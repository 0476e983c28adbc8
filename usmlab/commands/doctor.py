"""`usmlab doctor`: the troubleshooting checks on a target, as a pass/fail table."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from usmlab.commands import IdentityOption, JsonOption, TargetOption, WorkDirOption, friendly
from usmlab.errors import EXIT_FAILED


@friendly
def doctor_cmd(
    target: TargetOption = None,
    identity: IdentityOption = None,
    work_dir: WorkDirOption = None,
    port: Annotated[int, typer.Option(help="The lab server's port.")] = 8443,
    url: Annotated[str | None, typer.Option(help="Server URL for the TLS check.")] = None,
    usm_debugger: Annotated[str | None, typer.Option(help="usm-debugger binary to check.")] = None,
    as_json: JsonOption = False,
) -> None:
    """The troubleshooting checks on a target, as a pass/fail table with hints."""
    from usmlab.run.doctor import failed, render_checks, run_doctor
    from usmlab.targets import open_target

    lab_target = open_target(target, identity, work_dir)
    try:
        checks = run_doctor(lab_target, port=port, url=url, usm_debugger_path=usm_debugger)
    finally:
        lab_target.close()
    if as_json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        print(render_checks(checks))
    # Not 1: that status means "misattribution found" everywhere else (README, exit codes).
    raise typer.Exit(EXIT_FAILED if failed(checks) else 0)
