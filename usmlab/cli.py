"""Command-line interface: parses arguments, calls the lab library, prints. Nothing else."""

from __future__ import annotations

import functools
import os
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
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("USMLAB_DEBUG"):
                raise
            _say(f"usmlab: internal error: {type(exc).__name__}: {exc} (USMLAB_DEBUG=1 shows more)")
            raise typer.Exit(1) from None

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
        if p.duration:
            count += f" for {p.duration:g}s"
        ports = ",".join(str(port) for port in p.ports)
        print(f"{s.name}")
        print(f"    {s.description}")
        print(f"    hypothesis/goal: {s.goal}")
        print(
            f"    defaults: {count}, interval {p.interval:g}s, {p.client} client x{p.clients}, "
            f"server port(s) {ports}"
        )


@app.command("test")
@friendly
def test_cmd(
    scenario: Annotated[str, typer.Argument(help="Scenario name (see `usmlab scenarios`).")],
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="local, vagrant (the lab VM; the default when it exists) or "
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
    servers: Annotated[
        str | None, typer.Option(help="Server ports, e.g. 8443,9443 (one server each).")
    ] = None,
    clients: Annotated[
        int | None, typer.Option(help="Client processes, each with paths of its own.")
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
) -> None:
    """Run a scenario on a target, collect every artifact and print the verdict."""
    from usmlab.run.fleet import read_hosts_file
    from usmlab.scenarios import get_scenario, parse_duration, parse_paths, parse_ports
    from usmlab.targets.local import default_state_dir
    from usmlab.tracers import TRACER_NAMES

    chosen = get_scenario(scenario)
    if tracer not in ("auto", *TRACER_NAMES):
        raise UsageError(f"unknown tracer {tracer!r}: use auto, {', '.join(TRACER_NAMES)}")
    params = chosen.with_overrides(
        url=url,
        count=count,
        interval=None if interval is None else parse_duration(interval, "interval"),
        duration=None if duration is None else parse_duration(duration, "duration"),
        concurrency=concurrency,
        connection=connection,
        paths=None if paths is None else parse_paths(paths),
        client=client,
        servers=None if servers is None else parse_ports(servers),
        clients=clients,
        transport_per_request=transport_per_request,
        skip_close=skip_close,
        gc_every=gc_every,
        restart=restart,
        restart_after=None if restart_after is None else parse_duration(restart_after, "delay"),
        preexisting=None if preexisting is None else parse_duration(preexisting, "lead time"),
    )
    specs = list(target or [])
    if hosts is not None:
        specs += read_hosts_file(hosts)
    if not specs:
        from usmlab.targets import default_target_spec

        specs = [default_target_spec()]
    for spec in specs:
        if spec not in ("local", "vagrant") and not spec.startswith("ssh://"):
            raise UsageError(
                f"unknown target {spec!r}: use 'local', 'vagrant' or 'ssh://USER@HOST[:PORT]'"
            )
    if identity is not None and not identity.is_file():
        raise UsageError(f"identity file {identity} not found")
    options = {
        "runs_dir": runs_dir,
        "tracer": tracer,
        "state_dir": state_dir or default_state_dir(),
        "sysprobe_socket": sysprobe_socket,
        "usm_debugger": usm_debugger,
    }
    if len(specs) > 1:
        _test_many(specs, chosen, params, identity, work_dir, options)
    _test_one(specs[0], chosen, params, identity, work_dir, options)


def _test_one(
    spec: str,
    scenario: Any,
    params: Any,
    identity: Path | None,
    work_dir: str | None,
    options: dict[str, Any],
) -> None:
    from usmlab.analysis.report import render_table
    from usmlab.run.pipeline import LabRun
    from usmlab.targets import open_target

    lab_target = open_target(spec, identity, work_dir)
    try:
        result = LabRun(lab_target, scenario, params, progress=_say, **options).execute()
    finally:
        lab_target.close()
    print(result.run_dir)
    if result.report is not None:
        print(render_table(result.report))
    summary = result.manifest.get("client_summary") or {}
    if summary.get("sent"):
        jitter = summary.get("jitter_ms") or {}
        print(
            f"client: {summary.get('ok', 0)}/{summary.get('sent', 0)} ok, start jitter "
            f"p50 {jitter.get('p50') or 0:.1f} ms, p99 {jitter.get('p99') or 0:.1f} ms, "
            f"max {jitter.get('max') or 0:.1f} ms"
        )
    if result.status != "complete":
        _say(f"usmlab: run {result.status}: {result.error or 'see manifest.json'}")
        _say(f"usmlab: files kept in {result.run_dir}")
    elif result.error:
        _say(f"usmlab: error: {result.error}")
    raise typer.Exit(result.exit_code)


def _test_many(
    specs: list[str],
    scenario: Any,
    params: Any,
    identity: Path | None,
    work_dir: str | None,
    options: dict[str, Any],
) -> None:
    from usmlab.run.fleet import fleet_table, run_fleet, worst_exit

    results = run_fleet(
        specs, scenario, params, identity=identity, work_dir=work_dir, progress=_say, **options
    )
    for r in results:
        print(r.result.run_dir if r.result else f"{r.spec}: {r.error}")
    print(fleet_table(results))
    raise typer.Exit(worst_exit([r.exit_code for r in results]))


@app.command("collect")
@friendly
def collect_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The local run folder of a remote run.")],
    identity: Annotated[Path | None, typer.Option(help="SSH key (default: the run's).")] = None,
) -> None:
    """Fetch (again) every file of a remote run, verify it, and recompute the verdict."""
    from usmlab.analysis.report import exit_status, render_table
    from usmlab.run.collect import collect_run

    collected = collect_run(run_dir, identity)
    print(f"{run_dir}: fetched {len(collected.fetched)} file(s), all verified by sha256")
    if collected.report is not None:
        print(render_table(collected.report))
        raise typer.Exit(exit_status(collected.report))


@app.command("cleanup")
@friendly
def cleanup_cmd(
    target: Annotated[str, typer.Option(help="local or ssh://USER@HOST[:PORT].")] = "local",
    identity: Annotated[Path | None, typer.Option(help="SSH private key.")] = None,
    work_dir: Annotated[str | None, typer.Option(help="usmlab's folder on the target.")] = None,
) -> None:
    """End processes that crashed runs left on a target (never anything else)."""
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
    if not ended:
        print("nothing to clean up")


@app.command("build")
@friendly
def build_cmd(
    target: Annotated[str, typer.Option(help="Where to build: the VM's ssh:// or local.")] = (
        "local"
    ),
    identity: Annotated[Path | None, typer.Option(help="SSH private key.")] = None,
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
            progress=_say,
        )  # fmt: skip
    finally:
        lab_target.close()
    print(
        f"built {built.binary} ({built.size} bytes, sha256 {built.sha256[:16]}...) "
        f"in {built.duration_s:.0f} s; record: {record}"
    )


@app.command("doctor")
@friendly
def doctor_cmd(
    target: Annotated[str, typer.Option(help="local or ssh://USER@HOST[:PORT].")] = "local",
    identity: Annotated[Path | None, typer.Option(help="SSH private key.")] = None,
    work_dir: Annotated[str | None, typer.Option(help="usmlab's folder on the target.")] = None,
    port: Annotated[int, typer.Option(help="The lab server's port.")] = 8443,
    url: Annotated[str | None, typer.Option(help="Server URL for the TLS check.")] = None,
    usm_debugger: Annotated[str | None, typer.Option(help="usm-debugger binary to check.")] = None,
) -> None:
    """The seed's troubleshooting checks on a target, as a pass/fail table with hints."""
    from usmlab.run.doctor import failed, render_checks, run_doctor
    from usmlab.targets import open_target

    lab_target = open_target(target, identity, work_dir)
    try:
        checks = run_doctor(lab_target, port=port, url=url, usm_debugger_path=usm_debugger)
    finally:
        lab_target.close()
    print(render_checks(checks))
    raise typer.Exit(1 if failed(checks) else 0)


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
        parse_role_pairs,
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
        roles = parse_role_pairs(pid or [])
        report = analyze_capture(trace, roles, threads, client_log)
        destination = out or trace.parent
    destination.mkdir(parents=True, exist_ok=True)
    write_report(report, destination)
    print(render_table(report))
    print(f"report: {destination / 'report.json'}")
    raise typer.Exit(exit_status(report))


# -- the lab VM -------------------------------------------------------------------------------


@app.command("init")
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


@app.command("up")
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
) -> None:
    """Create, start and provision the lab VM (quick when it is already up)."""
    from usmlab.vm import vagrant

    overrides: dict[str, Any] = {
        "provider": provider, "box": box, "cpus": cpus, "memory": memory,
        "agent_path": agent_path, "profile": profile,
    }  # fmt: skip
    if lab:
        from usmlab.vm.box import build_test_box
        from usmlab.vm.libvirt_host import ensure_libvirt_daemons

        ensure_libvirt_daemons(_say)
        given = {k: v for k, v in overrides.items() if v is not None}
        overrides = {**build_test_box(progress=_say).lab_settings(), "profile": "test", **given}
    settings = _vm_settings(**overrides)
    for line in settings.describe():
        _say(f"[vm] {line}")
    result = vagrant.up(Path.cwd(), settings, progress=_say, cwd=Path.cwd())
    print(f"VM {result.action} in {result.seconds:.1f} s; `usmlab test scenario1` now runs there")


@app.command("status")
@friendly
def status_cmd() -> None:
    """The lab VM's state (running, poweroff, not_created, ...)."""
    from usmlab.vm import vagrant

    print(vagrant.status(Path.cwd()))


@app.command("ssh")
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


@app.command("halt")
@friendly
def halt_cmd() -> None:
    """Stop the lab VM (keeps it)."""
    from usmlab.vm import vagrant

    vagrant.halt(Path.cwd(), progress=_say)


@app.command("destroy")
@friendly
def destroy_cmd() -> None:
    """Delete the lab VM (the box stays cached)."""
    from usmlab.vm import vagrant

    vagrant.destroy(Path.cwd(), progress=_say)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
