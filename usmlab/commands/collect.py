"""`usmlab collect RUN_DIR`: fetch a remote run's files again, verified; recompute the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from usmlab.commands import TerminalReporter, friendly


@friendly
def collect_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The local run folder of a remote run.")],
    identity: Annotated[Path | None, typer.Option(help="SSH key (default: the run's).")] = None,
) -> None:
    """Fetch (again) every file of a remote run, verify it, and recompute the verdict."""
    from usmlab.analysis.report import exit_status, render_table
    from usmlab.run.collect import collect_run

    reporter = TerminalReporter()
    collected = collect_run(run_dir, identity, progress=reporter)
    print(f"{run_dir}: fetched {len(collected.fetched)} file(s), all verified by sha256")
    if collected.report is not None:
        status = collected.manifest.get("status")
        print(render_table(collected.report, status))
        raise typer.Exit(exit_status(collected.report))
