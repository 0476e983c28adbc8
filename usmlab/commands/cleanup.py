"""`usmlab cleanup`: end what crashed runs left on a target, and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from usmlab.commands import IdentityOption, TargetOption, WorkDirOption, friendly


@friendly
def cleanup_cmd(
    target: TargetOption = None,
    identity: IdentityOption = None,
    work_dir: WorkDirOption = None,
    runs_dir: Annotated[
        Path, typer.Option(help="Run folders whose usmlab died mid-run are marked abandoned.")
    ] = Path("runs"),
) -> None:
    """End processes that crashed runs left on a target (never anything else)."""
    from usmlab.manifest import abandoned_runs
    from usmlab.run.cleanup import clean_target
    from usmlab.targets import open_target

    lab_target = open_target(target, identity, work_dir)
    try:
        ended = clean_target(lab_target)
    finally:
        lab_target.close()
    pids = [e for e in ended if "pid" in e]
    for entry in pids:
        print(f"ended pid {entry['pid']} (group {entry['pgid']}) of run {entry['run_id']}")
    for entry in ended:
        if entry.get("tracefs") == "restored":
            print(f"restored tracefs settings left by run {entry['run_id']}")
        if entry.get("nat") == "removed":
            print(f"removed the NAT rule left by run {entry['run_id']}")
    marked = abandoned_runs(runs_dir) if runs_dir.is_dir() else []
    for manifest in marked:
        manifest.mark_abandoned()
        print(f"marked {manifest.run_dir} abandoned (its usmlab stopped before the run ended)")
    if not ended and not marked:
        print("nothing to clean up")
