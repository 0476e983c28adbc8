"""`usmlab test SCENARIO`: run a scenario on one or several targets and print the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from usmlab.commands import TerminalReporter, friendly, say
from usmlab.errors import UsageError


def complete_scenario(incomplete: str) -> list[str]:
    """Shell completion of scenario names."""
    from usmlab.scenarios import SCENARIOS

    return [name for name in SCENARIOS if name.startswith(incomplete)]


@friendly
def test_cmd(
    scenario: Annotated[
        str,
        typer.Argument(
            help="Scenario name (see `usmlab scenarios`).", autocompletion=complete_scenario
        ),
    ],
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="local, vagrant (the lab VM; the default when it exists in this folder) or "
            "ssh://USER@HOST[:PORT]; repeat to run on several at once."
        ),
    ] = None,
    hosts: Annotated[
        Path | None, typer.Option(help="File with one target per line (adds to --target).")
    ] = None,
    identity: Annotated[Path | None, typer.Option(help="SSH private key for ssh:// targets.")] = (
        None
    ),
    work_dir: Annotated[
        str | None, typer.Option(help="Folder on the target for the kit and runs (~/usmlab).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Folder that receives run folders.")] = Path(
        "runs"
    ),
    tracer: Annotated[
        str,
        typer.Option(
            help="auto (builtin when root with BPF, else none), builtin, usm-debugger, none, or "
            "system-probe (already running on the target: collect its stats, start no tracer)."
        ),
    ] = "auto",
    usm_debugger: Annotated[
        str | None,
        typer.Option(help="usm-debugger on the target (/git/datadog-agent/bin/usm-debugger)."),
    ] = None,
    sysprobe_socket: Annotated[
        str | None,
        typer.Option(help="system-probe's socket (/opt/datadog-agent/run/sysprobe.sock)."),
    ] = None,
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
    paths: Annotated[
        str | None, typer.Option(help="Comma-separated request paths; {port} = server port.")
    ] = None,
    client: Annotated[str | None, typer.Option(help="Client workload: python or go.")] = None,
    server: Annotated[str | None, typer.Option(help="Server workload: python or go.")] = None,
    servers: Annotated[
        str | None, typer.Option(help="Server ports, e.g. 8443,9443 (one server each).")
    ] = None,
    clients: Annotated[
        int | None, typer.Option(help="Client processes, each with paths of its own.")
    ] = None,
    python_clients: Annotated[
        int | None, typer.Option(help="Go runs: Python client processes beside the Go ones.")
    ] = None,
    transport_per_request: Annotated[
        bool | None, typer.Option(help="Go: a new http.Transport per request (churn).")
    ] = None,
    skip_close: Annotated[
        float | None, typer.Option(help="Go: share of response bodies left unclosed, 0..1.")
    ] = None,
    gc_every: Annotated[int | None, typer.Option(help="Go: runtime.GC() every N requests.")] = (
        None
    ),
    close_nothing: Annotated[
        bool | None,
        typer.Option(help="Go: raw TLS, every connection dropped without Close (GC closes it)."),
    ] = None,
    same_layout: Annotated[
        bool | None,
        typer.Option(
            help="Python: clients run with address randomization off (as forked workers)."
        ),
    ] = None,
    restart: Annotated[
        str | None, typer.Option(help="Kill and respawn mid-traffic: client, server, both.")
    ] = None,
    restart_after: Annotated[
        str | None, typer.Option(help="When to restart, into the traffic: 3s.")
    ] = None,
    preexisting: Annotated[
        str | None, typer.Option(help="Traffic this long before the tracer attaches: 2s.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where certificates are kept (default ~/.local/state).")
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="One run per value of a parameter, then a table: skip_close=0,0.3,1."),
    ] = None,
    junit: Annotated[
        Path | None, typer.Option(help="Also write the verdict as JUnit XML to this file.")
    ] = None,
) -> None:
    """Run a scenario on a target, collect every artifact and print the verdict."""
    from usmlab.manifest import check_runs_dir
    from usmlab.run.fleet import read_hosts_file
    from usmlab.scenarios import get_scenario, parse_duration, parse_paths, parse_ports
    from usmlab.targets import check_target_spec
    from usmlab.targets.local import default_state_dir
    from usmlab.tracers import check_tracer_fits, check_tracer_name

    chosen = get_scenario(scenario)
    check_tracer_name(tracer)
    params = chosen.with_overrides(
        url=url,
        count=count,
        interval=None if interval is None else parse_duration(interval, "interval"),
        duration=None if duration is None else parse_duration(duration, "duration"),
        concurrency=concurrency,
        connection=connection,
        paths=None if paths is None else parse_paths(paths),
        client=client,
        server=server,
        servers=None if servers is None else parse_ports(servers),
        clients=clients,
        python_clients=python_clients,
        transport_per_request=transport_per_request,
        skip_close=skip_close,
        gc_every=gc_every,
        close_nothing=close_nothing,
        same_layout=same_layout,
        restart=restart,
        restart_after=None if restart_after is None else parse_duration(restart_after, "delay"),
        preexisting=None if preexisting is None else parse_duration(preexisting, "lead time"),
    )
    check_tracer_fits(tracer, params)
    specs = list(target or [])
    if hosts is not None:
        specs += read_hosts_file(hosts)
    if not specs:
        from usmlab.targets import default_target_spec

        specs = [default_target_spec()]
    for spec in specs:
        check_target_spec(spec)
    if identity is not None and not identity.is_file():
        raise UsageError(f"identity file {identity} not found")
    check_runs_dir(runs_dir)
    options = {
        "runs_dir": runs_dir,
        "tracer": tracer,
        "state_dir": state_dir or default_state_dir(),
        "sysprobe_socket": sysprobe_socket,
        "usm_debugger": usm_debugger,
    }
    junit_to = junit
    if sweep is not None:
        _test_sweep(specs, chosen, params, sweep, identity, work_dir, options, junit_to)
    if len(specs) > 1:
        _test_many(specs, chosen, params, identity, work_dir, options, junit_to)
    _test_one(specs[0], chosen, params, identity, work_dir, options, junit_to)


def _junit(path: Path | None, results: list[Any]) -> None:
    if path is not None:
        from usmlab.analysis.junit import write_junit

        write_junit(path, results)


def _test_sweep(
    specs: list[str],
    scenario: Any,
    params: Any,
    sweep: str,
    identity: Path | None,
    work_dir: str | None,
    options: dict[str, Any],
    junit: Path | None = None,
) -> None:
    from usmlab.run.fleet import worst_exit
    from usmlab.run.pipeline import LabRun
    from usmlab.run.sweep import parse_sweep, run_sweep, sweep_params, sweep_table
    from usmlab.targets import open_target

    if len(specs) > 1:
        raise UsageError("--sweep runs on one target: give one --target")
    field, values = parse_sweep(sweep)
    settings = sweep_params(params, field, values)  # every setting checked before any run
    lab_target = open_target(specs[0], identity, work_dir)
    try:
        points = run_sweep(
            lambda p: LabRun(
                lab_target, scenario, p, progress=say, reporter=TerminalReporter(), **options
            ),
            settings,
            field,
        )
    finally:
        lab_target.close()
    for point in points:
        print(point.result.run_dir)
    print(sweep_table(field, points))
    _junit(junit, [p.result for p in points])
    raise typer.Exit(worst_exit([p.result.exit_code for p in points]))


def _test_one(
    spec: str,
    scenario: Any,
    params: Any,
    identity: Path | None,
    work_dir: str | None,
    options: dict[str, Any],
    junit: Path | None = None,
) -> None:
    from usmlab.analysis.report import render_table
    from usmlab.run.pipeline import LabRun
    from usmlab.targets import open_target

    lab_target = open_target(spec, identity, work_dir)
    try:
        reporter = TerminalReporter()
        try:
            result = LabRun(
                lab_target, scenario, params, progress=reporter.say, reporter=reporter, **options
            ).execute()
        finally:
            reporter.close()
    finally:
        lab_target.close()
    print(result.run_dir)
    _junit(junit, [result])
    if result.report is not None:
        print(render_table(result.report, result.status))
    summary = result.manifest.get("client_summary") or {}
    if summary.get("sent"):
        jitter = summary.get("jitter_ms") or {}
        print(
            f"client: {summary.get('ok', 0)}/{summary.get('sent', 0)} ok, start jitter "
            f"p50 {jitter.get('p50') or 0:.1f} ms, p99 {jitter.get('p99') or 0:.1f} ms, "
            f"max {jitter.get('max') or 0:.1f} ms"
        )
    if result.status != "complete":
        say(f"usmlab: run {result.status}: {result.error or 'see manifest.json'}")
        say(f"usmlab: files kept in {result.run_dir}")
    elif result.error:
        say(f"usmlab: error: {result.error}")
    raise typer.Exit(result.exit_code)


def _test_many(
    specs: list[str],
    scenario: Any,
    params: Any,
    identity: Path | None,
    work_dir: str | None,
    options: dict[str, Any],
    junit: Path | None = None,
) -> None:
    from usmlab.run.fleet import fleet_table, run_fleet, worst_exit

    results = run_fleet(
        specs, scenario, params, identity=identity, work_dir=work_dir, progress=say, **options
    )
    for r in results:
        print(r.result.run_dir if r.result else f"{r.spec}: {r.error}")
    print(fleet_table(results))
    _junit(junit, [r.result for r in results if r.result is not None])
    raise typer.Exit(worst_exit([r.exit_code for r in results]))
