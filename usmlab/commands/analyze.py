"""`usmlab analyze`: judge a run folder, or a raw trace_pipe capture, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from usmlab.commands import JsonOption, friendly
from usmlab.errors import UsageError


@friendly
def analyze_cmd(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A run folder to analyze again (offline).")
    ] = None,
    trace: Annotated[
        Path | None, typer.Option(help="A raw trace_pipe capture brought from elsewhere.")
    ] = None,
    pid: Annotated[
        list[str] | None, typer.Option(help="ROLE=PID of a lab process (repeatable).")
    ] = None,
    threads: Annotated[
        Path | None, typer.Option(help="Output of `ps -eLo pid,tid,comm` taken during the run.")
    ] = None,
    client_log: Annotated[Path | None, typer.Option(help="The client's client.jsonl.")] = None,
    out: Annotated[Path | None, typer.Option(help="Where report.json/report.md go.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Judge a run folder, or a raw trace_pipe capture, and print the verdict."""
    from usmlab.analysis.html import write_html_later
    from usmlab.analysis.report import (
        analyze_capture,
        analyze_run,
        exit_status,
        parse_role_pairs,
        render_table,
        write_report,
    )
    from usmlab.manifest import Manifest

    if (run_dir is None) == (trace is None):
        raise UsageError("give either a RUN_DIR or --trace FILE")
    if run_dir is not None:
        if pid or threads or client_log:
            raise UsageError("--pid, --threads and --client-log go with --trace, not RUN_DIR")
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(
                f"{run_dir} is a file, not a run folder (a capture? --trace {run_dir})"
            )
        if not (run_dir / "manifest.json").is_file():
            raise UsageError(f"{run_dir} is not a run folder (no manifest.json)")
        report = analyze_run(run_dir)
        destination = out or run_dir
        status = Manifest.read(run_dir).get("status")
    else:
        assert trace is not None
        for given in (trace, threads, client_log):
            if given is None or given.is_file():
                continue
            if given.is_dir():
                raise UsageError(
                    f"{given} is a folder, not a file (a run folder? usmlab analyze {given})"
                )
            if given.exists():
                raise UsageError(f"{given} is not a regular file (a device or a pipe)")
            raise UsageError(f"no such file: {given}")
        roles = parse_role_pairs(pid or [])
        report = analyze_capture(trace, roles, threads, client_log)
        destination = out or trace.parent
        status = None
    destination.mkdir(parents=True, exist_ok=True)
    write_report(report, destination)
    if run_dir is not None:
        write_html_later(destination)
    if as_json:
        print((destination / "report.json").read_text(), end="")
    else:
        print(render_table(report, status))
        print(f"report: {destination / 'report.json'}")
    raise typer.Exit(exit_status(report))
