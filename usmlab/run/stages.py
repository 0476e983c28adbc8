"""The stages of a run, each a small function of the run context.

`pipeline.py` runs them in one of its start orders (data); scenario behaviours come in through
the features' hooks (`features.py`). Why the orders are what they are: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time

from usmlab.certs import ensure_certs
from usmlab.errors import UsmlabError
from usmlab.kit import kit_files
from usmlab.run.cleanup import clean_target
from usmlab.run.context import RunContext, Started, TargetFacts
from usmlab.run.signals import held_signals
from usmlab.run.trace_reader import TracePipeCapture
from usmlab.scenarios import GO_ONLY, Params
from usmlab.targets.base import BackgroundProcess
from usmlab.tracers import TracerContext, make_tracer

READY_TIMEOUT = 20.0
ATTACH_TIMEOUT = 90.0
PROGRESS_EVERY = 2.0


def url_of(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


# -- prepare ---------------------------------------------------------------------------------


# The runs alive in a work dir: each marker (`_mark_active`) whose lifeline process still runs
# (/proc, not kill -0: the lease may run as root through sudo).
# Plain sh: it runs before the kit is uploaded. Prints "<run id> <pid>" per live run.
_LIVE_RUNS = r"""
for f in "$1"/*; do
  [ -f "$f" ] || continue
  pid=$(sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && printf '%s %s\n' "${f##*/}" "$pid"
done
exit 0
"""


def refuse_kit_change_under_a_live_run(ctx: RunContext, changed: list[str]) -> None:
    """The kit is about to change (`changed`: another usmlab version, or other certificates):
    a run alive in this work dir would have it replaced under it (its clients would then fail
    to verify its server). Runs sharing one kit (several targets on one machine) are fine."""
    target = ctx.target
    active = target.join(target.work_dir, "active")
    found = target.run(["sh", "-c", _LIVE_RUNS, "sh", active], check=False).stdout.split()
    if len(found) >= 2:
        run_id, pid = found[0], found[1]
        raise UsmlabError(
            f"target {target.label} is busy: run {run_id} (usmlab pid {pid}) is running in "
            f"{target.work_dir} with another kit ({', '.join(changed[:3])} differ); wait for it "
            "to end, or give this run another --work-dir"
        )


def deploy(ctx: RunContext) -> None:
    """Upload the kit, clean leftovers, mark the run alive and learn about the target."""
    target = ctx.target
    ctx.progress(f"target {target.label}: deploying the lab kit")
    certs = ensure_certs(ctx.state_dir / "certs")
    files = kit_files()
    files["ca.pem"] = certs.ca_cert
    files["server.pem"] = certs.server_cert
    files["server.key"] = certs.server_key
    ctx.kit_dir = target.join(target.work_dir, "kit")
    uploaded = target.sync(
        files, ctx.kit_dir, lambda changed: refuse_kit_change_under_a_live_run(ctx, changed)
    )
    ctx.remote_dir = target.run_dir_for(ctx.run_id, ctx.run_dir)
    ctx.manifest["kit"] = {"dir": ctx.kit_dir, "uploaded": uploaded}
    ctx.manifest["target"].update(run_dir=ctx.remote_dir, work_dir=target.work_dir)
    ended = [e for e in clean_target(target, deploy=False) if "pid" in e]
    if ended:
        ctx.progress(f"cleanup: ended {len(ended)} leftover process(es) of crashed runs")
    _mark_active(ctx)
    probe = target.python(ctx.kit("probe.py"), "info", "--port", str(ctx.params.port))
    facts = TargetFacts.from_probe(json.loads(target.run(probe).stdout))
    facts.raw["local_run_dir"] = str(ctx.run_dir)
    ctx.facts = facts
    # Every later kit script runs on the interpreter the probe ran on, named by its path:
    # the workloads then map the libssl the probe saw, under sudo too.
    target.use_python(facts.raw.get("python_executable"))
    ctx.manifest["target"].update(facts.for_manifest())


def _mark_active(ctx: RunContext) -> None:
    """Create the run folder on the target and, beside it, the marker that tells cleanup this
    run is alive while its lifeline process is (one command: over SSH each is a round trip).
    Its JSON ({"pid": ..., "run_dir": ...}) is read by kit/cleanup.py `read_markers` and, before
    the kit is there, by `_LIVE_RUNS` above."""
    target = ctx.target
    pid = target.lifeline_pid()
    if pid is None:
        target.run(["mkdir", "-p", "--", ctx.remote_dir])
        return
    marker = target.join(target.work_dir, "active", ctx.run_id)
    remove = ["rm", "-f", "--", marker]
    ctx.registry.add(Started("marker", "marker", stop=lambda: target.run(remove, check=False)))
    target.run(
        ["sh", "-c", 'mkdir -p -- "$1" "$2" && printf %s "$3" > "$4"', "sh",
         ctx.remote_dir, target.join(target.work_dir, "active"),
         json.dumps({"pid": pid, "run_dir": ctx.remote_dir}), marker],
    )  # fmt: skip
    ctx.active_marker = marker


def choose_tracer(ctx: RunContext) -> None:
    """`auto` means builtin when the target can run eBPF as root, else none."""
    assert ctx.facts is not None
    name = ctx.requested_tracer
    if name == "auto":
        can_root = ctx.facts.euid == 0 or ctx.target.can_sudo()
        name = "builtin" if can_root and ctx.facts.btf and ctx.facts.bpftrace else "none"
    ctx.tracer = make_tracer(name)
    ctx.tracer_name = ctx.manifest["tracer"] = name
    if ctx.tracer is not None:
        ctx.manifest.update(ctx.tracer.manifest_facts())
    ctx.save_manifest()


def plan(ctx: RunContext) -> None:
    """Server ports (a feature may move them), binaries built (features), ports checked free."""
    ctx.server_ports = list(ctx.params.ports)
    for feature in ctx.features:
        feature.plan(ctx)
    ctx.manifest["server_ports"] = ctx.server_ports
    for port in ctx.server_ports:
        busy = _port_holder(ctx, port)
        if busy:
            raise UsmlabError(busy)
    ctx.lap("deploy")


def _port_holder(ctx: RunContext, port: int) -> str | None:
    """Who holds the port, in one line, or None when it is free (the probe checked the URL's)."""
    if port == ctx.params.port and ctx.facts is not None:
        return ctx.facts.port_in_use
    result = ctx.target.run(ctx.target.python(ctx.kit("probe.py"), "port", str(port)), check=False)
    return (result.stdout.strip() or f"port {port} is in use") if result.exit_code else None


# -- observers -------------------------------------------------------------------------------


def claim_trace_pipe(ctx: RunContext) -> None:
    """Start the trace_pipe reader and wait until it holds trace_pipe, before any tracer starts:
    a run that loses trace_pipe to another reader then attaches no probe at all."""
    if ctx.tracer is None:
        return
    ctx.progress("capture: opening trace_pipe")
    capture = ctx.capture = TracePipeCapture(ctx.target, ctx.remote_dir, ctx.kit_dir)
    entry = ctx.registry.add(Started("capture", "capture", stop=lambda: _stop_capture(ctx)))
    with held_signals():
        entry.proc = capture.start(ctx.env("capture", "capture"))
    ctx.save_manifest()
    capture.wait_ready()
    ctx.note_capture_state()
    ctx.lap("capture")


def start_observers(ctx: RunContext) -> None:
    """Start the tracer, the thread sampler and (system-probe) the stats fetcher; `attached`
    waits until the probes are in."""
    target, tracer = ctx.target, ctx.tracer
    if tracer is not None:
        ctx.progress(f"tracer {tracer.name}: starting")
        assert ctx.facts is not None
        tctx = TracerContext(
            run_id=ctx.run_id,
            run_dir=ctx.remote_dir,
            kit_dir=ctx.kit_dir,
            facts=ctx.facts.raw,
            env=ctx.env("tracer", "tracer"),
            go_binaries=[b for b in (ctx.go_client, ctx.go_server) if b],
            binary=ctx.usm_debugger,
        )
        # A tracer that prints at each probe hit has nothing more to say about the lab once
        # the clients are done: told to stop then, its exit overlaps the rest of the teardown;
        # the reader may then drain once the servers are down.
        early = tracer.stops_early
        with held_signals():
            proc = tracer.start(target, tctx)
            ctx.registry.process(proc, "tracer", nudge=("client", signal.SIGINT) if early else None)
        ctx.manifest.update(tracer.manifest_facts())  # what it chose once it saw the run
        if early and ctx.capture is not None:
            capture_entry = next(e for e in ctx.registry.entries if e.role == "capture")
            capture_entry.nudge = ("server", signal.SIGTERM)
        ctx.save_manifest()
        ctx.attaching = (tctx, proc, time.monotonic())
    sampler = ctx.kit_script(
        "sampler", "sampler", "thread_sampler.py",
        "--run-id", ctx.run_id, "--out", ctx.remote("threads.jsonl"),
    )  # fmt: skip
    ctx.start(sampler, name="sampler", role="sampler", sudo=tracer is not None)
    if ctx.tracer_name == "system-probe":
        _start_sysprobe_fetch(ctx)
    if ctx.tracer_name in ("usm-debugger", "system-probe"):
        _start_usm_maps(ctx)
    ctx.lap("observers")


def _start_usm_maps(ctx: RunContext) -> None:
    """Dump USM's tuple caches while the real tracer runs (kit/usm_maps.py): for usm-debugger
    the maps its process holds, for system-probe the machine's. No bpftool: said, and skipped."""
    tracers = ctx.registry.procs("tracer")
    pids = ",".join(str(p.pid) for p in tracers)
    argv = ctx.kit_script(
        "usm-maps", "maps", "usm_maps.py", "dump", "--out", ctx.remote("usm_maps.jsonl"),
        "--every", str(ctx.usm_maps_every_ms), *(["--pids", pids] if pids else []),
    )  # fmt: skip
    ctx.start(argv, name="usm-maps", role="maps", sudo=True)


def _stop_capture(ctx: RunContext) -> None:
    assert ctx.capture is not None
    ctx.capture.stop()  # also when it never started: restores what it prepared
    ctx.note_capture_state()  # also when interrupted before it was ready


def attached(ctx: RunContext) -> None:
    """Return once the tracer has its probes attached."""
    if ctx.attaching is None or ctx.tracer is None:
        return
    tctx, proc, t0 = ctx.attaching
    ctx.attaching = None
    with ctx.reporter.waiting(f"tracer {ctx.tracer.name}: waiting for its probes to attach"):
        ctx.tracer.wait_attached(ctx.target, tctx, proc, ATTACH_TIMEOUT, ctx.abort)
    ctx.manifest["tracer_attached_mono"] = ctx.tracer.attached_mono
    ctx.manifest["tracer_attached"] = getattr(ctx.tracer, "attached_summary", None)
    ctx.progress(f"tracer {ctx.tracer.name}: attached in {time.monotonic() - t0:.1f} s")
    ctx.lap("attach")


def _start_sysprobe_fetch(ctx: RunContext) -> None:
    """system-probe already runs on the target: collect its stats, start no tracer."""
    from usmlab.run.sysprobe_fetch import (
        DEFAULT_SOCKET,
        endpoint_urls,
        fetch_final,
        start_periodic,
        stop_periodic,
    )

    socket = ctx.sysprobe_socket or DEFAULT_SOCKET
    ctx.progress(f"system-probe: fetching its stats from {socket}")
    ctx.manifest["sysprobe"] = {"socket": socket, "client_ids": endpoint_urls(ctx.run_id)}
    entry = ctx.registry.add(Started("sysprobe-fetch", "sysprobe"))

    def finish() -> None:
        """Stop the periodic fetch after its round, then take the final dumps."""
        stop_periodic(ctx.target, proc)
        final = fetch_final(ctx.target, ctx.kit_dir, ctx.remote_dir, ctx.run_id, socket=socket)
        ctx.manifest["sysprobe"]["warnings"] = final.warnings

    with held_signals():
        entry.proc = proc = start_periodic(
            ctx.target, ctx.kit_dir, ctx.remote_dir, ctx.run_id, socket=socket,
            env=ctx.env("sysprobe-fetch", "sysprobe"),
        )  # fmt: skip
        entry.stop = finish


# -- workloads -------------------------------------------------------------------------------


def start_servers(ctx: RunContext) -> None:
    for port in ctx.server_ports:
        start_server(ctx, "server" if len(ctx.server_ports) == 1 else f"server-{port}", port)
    for feature in ctx.features:
        feature.servers_started(ctx)
    ctx.lap("server")


def start_server(ctx: RunContext, name: str, port: int) -> BackgroundProcess:
    target, params = ctx.target, ctx.params
    program = target.python(ctx.kit("server.py"))
    for feature in ctx.features:
        program = feature.server_program(ctx, program)
    flags = [
        "--host", params.host, "--port", str(port), "--name", name,
        "--cert", ctx.kit("server.pem"), "--key", ctx.kit("server.key"),
        "--log", ctx.remote(f"{name}.jsonl"),
    ]  # fmt: skip
    argv = ctx.with_env(name, "server", [*program, *flags])
    server = ctx.start(argv, name=name, role="server", port=port)
    _wait_listening(ctx, server)
    url = url_of(params.host, port)
    check = target.run(
        [*target.python(ctx.kit("client.py")), "--check", "-url", url,
         "--timeout", str(READY_TIMEOUT)],
        check=False,
        timeout=READY_TIMEOUT + 10,
    )  # fmt: skip
    if not check.ok:
        code = target.poll(server)
        log = target.read_text(server.stdout_path).strip().splitlines()
        reason = log[-1] if log and code is not None else check.stderr.strip()
        raise UsmlabError(f"{name} did not become ready: {reason}")
    ctx.progress(f"{name}: ready on {url} (pid {server.pid})")
    return server


def _wait_listening(ctx: RunContext, server: BackgroundProcess) -> None:
    """Return once this server says it listens (it prints its pid after binding the port), so
    the readiness check that follows can only reach it: another process on the port (another
    run's server) makes this one exit, and the run fail, instead of borrowing that server."""
    said = f"(PID: {server.pid})"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            log = ctx.target.read_text(server.stdout_path)
        except UsmlabError:
            log = ""  # not written yet
        if said in log:
            return
        code = ctx.target.poll(server)
        if code is not None:
            lines = log.strip().splitlines()
            reason = lines[-1] if lines else f"exit status {code}"
            raise UsmlabError(f"{server.name} exited before listening: {reason}")
        if time.monotonic() > deadline:
            raise UsmlabError(f"{server.name} did not listen within {READY_TIMEOUT:.0f} s")
        ctx.check_abort()
        time.sleep(0.02)


def start_clients(ctx: RunContext, duration: float | None = None, suffix: str = "") -> None:
    ctx.clients = []
    for index in range(ctx.params.clients):
        name = ("client" if ctx.params.clients == 1 else f"client-{index + 1}") + suffix
        ctx.clients.append(_start_client(ctx, name, index, duration))
    for index in range(ctx.params.python_clients):
        name = f"client-py-{index + 1}{suffix}"
        ctx.clients.append(_start_python_neighbour(ctx, name, duration))


def _start_client(
    ctx: RunContext, name: str, index: int, duration: float | None
) -> BackgroundProcess:
    paths = ctx.params.paths
    program = ctx.target.python(ctx.kit("client.py"))
    for feature in ctx.features:
        paths = feature.client_paths(ctx, index, paths)
        program = feature.client_program(ctx, program)
    flags = _client_flags(ctx, ctx.params, name, paths, duration)
    for feature in ctx.features:
        flags = feature.client_flags(ctx, name, flags)
    argv = ctx.with_env(name, "client", [*program, *flags])
    return ctx.start(argv, name=name, role="client")


def _start_python_neighbour(
    ctx: RunContext, name: str, duration: float | None
) -> BackgroundProcess:
    """A Python client beside Go ones (`--python-clients`): its own TLS connections through
    libssl, a new one per request, to the same servers, with paths of its own. The features
    that shape the Go clients (program, flags, paths) are not its."""
    params = dataclasses.replace(ctx.params, client="python", connection="new", **{
        f: getattr(Params, f) for f in GO_ONLY})  # fmt: skip
    base = name.split("-r")[0]  # a restarted one keeps its paths
    paths = (f"/api/v1/namespaces/{base}/configmaps", f"/api/v1/namespaces/{base}/pods")
    flags = _client_flags(ctx, params, name, paths, duration)
    program = ctx.target.python(ctx.kit("client.py"))
    return ctx.start(ctx.with_env(name, "client", [*program, *flags]), name=name, role="client")


def _client_flags(
    ctx: RunContext, params: Params, name: str, paths: tuple[str, ...], duration: float | None
) -> list[str]:
    """What every client is told: the servers (as the features route them), the traffic,
    the CA and its log."""
    urls = [url_of(params.host, port) for port in ctx.server_ports]
    for feature in ctx.features:
        urls = feature.client_urls(ctx, urls)
    flags = params.client_args(urls, paths)
    if duration is not None:
        flags += ["--duration", f"{duration}"]
    return [*flags, "--cacert", ctx.kit("ca.pem"), "--log", ctx.remote(f"{name}.jsonl")]


def lead_time(ctx: RunContext) -> None:
    for feature in ctx.features:
        feature.lead_time(ctx)


def traffic(ctx: RunContext) -> None:
    """Wait for the clients, showing progress; features act on the way (restarts)."""
    params = ctx.params
    if not params.count and params.duration is None:
        ctx.progress("client: running until Ctrl-C (or use --duration)")
    started = last = time.monotonic()
    while True:
        servers = ctx.registry.live("server")
        states = ctx.target.poll_many([*ctx.clients, *servers])
        codes, server_codes = states[: len(ctx.clients)], states[len(ctx.clients) :]
        for server, code in zip(servers, server_codes, strict=True):
            if code is not None:  # not stopped by usmlab: the run did not measure what it says
                lines = ctx.target.read_text(server.stdout_path).strip().splitlines()
                reason = lines[-1] if lines else "no output"
                raise UsmlabError(f"{server.name} exited (status {code}) mid-traffic: {reason}")
        if all(code is not None for code in codes):
            break
        ctx.check_abort()
        time.sleep(0.1)
        now = time.monotonic()
        for feature in ctx.features:
            feature.tick(ctx, now - started)
        if now - last >= PROGRESS_EVERY:
            last = now
            total = params.count * (params.clients + params.python_clients)
            ctx.reporter.requests(_requests_done(ctx), total or None)
    ctx.progress(f"client: finished (exit {', '.join(str(c) for c in codes)})")
    for client, code in zip(ctx.clients, codes, strict=True):
        if code == 2:  # the client's usage error: it sent nothing, say why
            lines = ctx.target.read_text(client.stdout_path).strip().splitlines()
            reason = lines[-1] if lines else "exit status 2"
            raise UsmlabError(f"{client.name} refused its arguments: {reason}")
    ctx.lap("client")


def _requests_done(ctx: RunContext) -> int:
    names = [ctx.remote(f"{p.name}.jsonl") for p in ctx.registry.procs("client")]
    return ctx.target.run(["cat", "--", *names], check=False).stdout.count("\n")
