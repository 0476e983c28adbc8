"""Command-line interface: parses arguments, calls the lab library, prints. Nothing else."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from usmlab import __version__
from usmlab.errors import UsageError, UsmlabError

app = typer.Typer(
    name="usmlab",
    help="Run the USM misattribution lab with one command and get a verdict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])


def _say(message: str) -> None:
    """Progress goes to stderr so stdout stays the result (run folder, verdict)."""
    print(message, file=sys.stderr, flush=True)


def friendly(func: F) -> F:
    """Turn the library's errors into one line and an exit status, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UsmlabError as exc:
            _say(f"usmlab: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _say("usmlab: interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        print(f"usmlab {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """usmlab: provision, run, capture and judge the USM misattribution lab."""


@app.command("scenarios")
@friendly
def scenarios_cmd() -> None:
    """List the named scenarios, their goal and defaults."""
    from usmlab.scenarios import SCENARIOS

    for s in SCENARIOS.values():
        p = s.params
        count = "until stopped" if p.count == 0 else f"{p.count} requests"
        print(f"{s.name:<12} {s.description}")
        print(f"{'':<12} goal: {s.goal}")
        print(f"{'':<12} defaults: {count}, interval {p.interval:g}s, {p.url}")


@app.command("test")
@friendly
def test_cmd(
    scenario: Annotated[str, typer.Argument(help="Scenario name (see `usmlab scenarios`).")],
    target: Annotated[str, typer.Option(help="Where to run: local.")] = "local",
    runs_dir: Annotated[Path, typer.Option(help="Folder that receives run folders.")] = Path(
        "runs"
    ),
    tracer: Annotated[
        str, typer.Option(help="auto (builtin when root with BPF, else none), builtin, none.")
    ] = "auto",
    url: Annotated[str | None, typer.Option(help="Server URL (loopback only).")] = None,
    count: Annotated[int | None, typer.Option(help="Requests to send; 0 = until stopped.")] = None,
    interval: Annotated[
        str | None, typer.Option(help="Request schedule step: 2s, 500ms, 0.1.")
    ] = None,
    duration: Annotated[str | None, typer.Option(help="Stop after this long: 30s, 5m.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Client worker threads.")] = None,
    connection: Annotated[
        str | None, typer.Option(help="new: a TLS connection per request; reuse: keep-alive.")
    ] = None,
    paths: Annotated[str | None, typer.Option(help="Comma-separated request paths.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where certificates are kept (default ~/.local/state).")
    ] = None,
) -> None:
    """Run a scenario on a target, collect every artifact and print the verdict."""
    from usmlab.scenarios import get_scenario, parse_duration, parse_paths
    from usmlab.targets import open_target
    from usmlab.targets.local import default_state_dir

    chosen = get_scenario(scenario)
    if tracer not in ("auto", "builtin", "none"):
        raise UsageError(f"unknown tracer {tracer!r}: use auto, builtin or none")
    params = chosen.with_overrides(
        url=url,
        count=count,
        interval=None if interval is None else parse_duration(interval, "interval"),
        duration=None if duration is None else parse_duration(duration, "duration"),
        concurrency=concurrency,
        connection=connection,
        paths=None if paths is None else parse_paths(paths),
    )
    lab_target = open_target(target)
    from usmlab.analysis.report import render_table
    from usmlab.runner import LabRun

    try:
        run = LabRun(
            lab_target,
            chosen,
            params,
            runs_dir=runs_dir,
            tracer=tracer,
            state_dir=state_dir or default_state_dir(),
            progress=_say,
        )
        result = run.execute()
    finally:
        lab_target.close()
    print(result.run_dir)
    if result.report is not None:
        print(render_table(result.report))
    summary = result.manifest.get("client_summary") or {}
    if summary:
        jitter = summary.get("jitter_ms") or {}
        print(
            f"client: {summary.get('ok', 0)}/{summary.get('sent', 0)} ok, start jitter "
            f"p50 {jitter.get('p50', 0):.1f} ms, p99 {jitter.get('p99', 0):.1f} ms, "
            f"max {jitter.get('max', 0):.1f} ms"
        )
    if result.status != "complete":
        _say(f"usmlab: run {result.status}: {result.error or 'see manifest.json'}")
        _say(f"usmlab: files kept in {result.run_dir}")
    raise typer.Exit(result.exit_code)


def _parse_roles(pairs: list[str]) -> dict[str, list[int]]:
    """`--pid client=123 --pid server=45` → {"client": [123], "server": [45]}."""
    roles: dict[str, list[int]] = {}
    for pair in pairs:
        name, sep, pid = pair.partition("=")
        if not sep or not name or not pid.strip().isdigit():
            raise UsageError(f"malformed --pid {pair!r}: expected ROLE=PID, e.g. client=1234")
        roles.setdefault(name.strip(), []).append(int(pid))
    return roles


@app.command("analyze")
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
) -> None:
    """Judge a run folder, or a raw trace_pipe capture, and print the verdict."""
    from usmlab.analysis.report import (
        analyze_capture,
        analyze_run,
        exit_status,
        render_table,
        write_report,
    )

    if (run_dir is None) == (trace is None):
        raise UsageError("give either a RUN_DIR or --trace FILE")
    if run_dir is not None:
        if pid or threads or client_log:
            raise UsageError("--pid, --threads and --client-log go with --trace, not RUN_DIR")
        if not (run_dir / "manifest.json").is_file():
            raise UsageError(f"{run_dir} is not a run folder (no manifest.json)")
        report = analyze_run(run_dir)
        destination = out or run_dir
    else:
        assert trace is not None
        for given in (trace, threads, client_log):
            if given is not None and not given.is_file():
                raise UsageError(f"no such file: {given}")
        roles = _parse_roles(pid or [])
        report = analyze_capture(trace, roles, threads, client_log)
        destination = out or trace.parent
    destination.mkdir(parents=True, exist_ok=True)
    write_report(report, destination)
    print(render_table(report))
    print(f"report: {destination / 'report.json'}")
    raise typer.Exit(exit_status(report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
