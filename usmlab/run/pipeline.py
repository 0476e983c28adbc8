"""One lab run: deploy, start everything in order, stop everything, collect, analyze.

Start order (field notes §1): trace_pipe reader, thread sampler, tracer (wait until attached),
server (wait until it completes a TLS handshake), client. Stop order is the reverse, and it runs
whatever happened before: an error, Ctrl-C or SIGTERM still stops every process this run started
(by process group, never by name), restores tracefs, and keeps every file, with the manifest
saying whether the run was complete, interrupted or failed.
"""

from __future__ import annotations

import contextlib
import json
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usmlab import __version__
from usmlab.analysis.report import analyze_run, exit_status, workload_logs, write_report
from usmlab.certs import ensure_certs
from usmlab.errors import RunInterrupted, UsmlabError
from usmlab.kit import kit_files
from usmlab.kit.client import summarize
from usmlab.manifest import file_inventory, new_run_dir, now_iso, write_manifest
from usmlab.run.cleanup import clean_target
from usmlab.run.trace_reader import TracePipeCapture
from usmlab.scenarios import Params, Scenario, check_url
from usmlab.targets.base import BackgroundProcess, Target
from usmlab.tracers import Tracer, TracerContext
from usmlab.tracers.builtin import BuiltinTracer

Progress = Callable[[str], None]

# Teardown order by role: traffic first, the processes watching it next, the trace reader last.
STOP_STAGE = {
    "client": 0, "server": 1, "sysprobe": 2, "tracer": 3, "sampler": 3, "capture": 4,
}  # fmt: skip
# A restart is a crash-like stop: SIGTERM, as Kubernetes sends, then SIGKILL.
RESTART_STOP = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))

READY_TIMEOUT = 20.0
ATTACH_TIMEOUT = 90.0
PROGRESS_EVERY = 2.0


@dataclass
class RunResult:
    run_dir: Path
    status: str
    exit_code: int
    manifest: dict[str, Any]
    report: Any = None
    error: str | None = None


@dataclass
class _Started:
    """Processes in start order, so they can be stopped in reverse."""

    procs: list[tuple[BackgroundProcess, str]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def add(self, proc: BackgroundProcess, role: str, port: int | None = None) -> BackgroundProcess:
        self.procs.append((proc, role))
        if port is not None:
            self.ports[proc.name] = port
        return proc


def client_failure(records: list[dict[str, Any]]) -> str | None:
    """Why a run's clients got no successful answer at all, or None if some request succeeded."""
    for record in records:
        if record.get("error") is None and 200 <= (record.get("status") or 0) < 400:
            return None
    if not records:
        return None
    first = records[0]
    reason = first.get("error") or f"status {first.get('status')}"
    return f"none of the {len(records)} requests succeeded: {reason}"


def choose_tracer(requested: str, target: Target, facts: dict[str, Any]) -> str:
    """`auto` means builtin when the target can run eBPF as root, else none."""
    if requested != "auto":
        return requested
    can_root = facts.get("euid") == 0 or target.can_sudo()
    if can_root and facts.get("btf") and facts.get("bpftrace"):
        return "builtin"
    return "none"


def make_tracer(name: str) -> Tracer | None:
    """The eBPF tracer to start; None for `none` and for `system-probe` (already running)."""
    if name == "builtin":
        return BuiltinTracer()
    if name == "usm-debugger":
        from usmlab.tracers.usm_debugger import UsmDebuggerTracer

        return UsmDebuggerTracer()
    if name in ("none", "system-probe"):
        return None
    raise UsmlabError(
        f"unknown tracer {name!r}: use auto, builtin, usm-debugger, none or system-probe",
        exit_code=2,
    )


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM ends a run the way Ctrl-C does: stopped cleanly, marked interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[list[int]]:
    """Cleanup must finish: a second Ctrl-C during it is noted, not obeyed."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list[int] = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class LabRun:
    """Runs one scenario on one target into one run folder."""

    def __init__(
        self,
        target: Target,
        scenario: Scenario,
        params: Params,
        *,
        runs_dir: Path,
        tracer: str = "auto",
        state_dir: Path,
        progress: Progress = lambda message: None,
        sysprobe_socket: str | None = None,
        usm_debugger: str | None = None,
    ) -> None:
        self.target = target
        self.scenario = scenario
        self.params = params
        self.runs_dir = runs_dir
        self.requested_tracer = tracer
        self.state_dir = state_dir
        self.progress = progress
        self.started = _Started()
        self.capture: TracePipeCapture | None = None
        self.active_marker: str | None = None
        self.abort = threading.Event()  # set by a controller running several targets at once
        self.phases: dict[str, float] = {}
        self.sysprobe_socket = sysprobe_socket
        self.usm_debugger = usm_debugger
        self.sysprobe: BackgroundProcess | None = None
        self.server_ports: list[int] = list(params.ports)
        self.clients: list[BackgroundProcess] = []
        self.go_client: str | None = None
        self.tracer_name = tracer
        self.nat: Any = None
        self.restarts = 0
        self.client_logs: list[Path] = []
        self.client_records: list[dict[str, Any]] = []
        self._lap_start = time.monotonic()
        self.manifest: dict[str, Any] = {}
        self.tracer: Tracer | None = None
        self._attaching: tuple[Tracer, TracerContext, BackgroundProcess, float] | None = None

    # -- helpers ---------------------------------------------------------------------------

    def _env(self, name: str, role: str) -> dict[str, str]:
        return {"USMLAB_RUN_ID": self.run_id, "USMLAB_NAME": name, "USMLAB_ROLE": role}

    def _kit(self, name: str) -> str:
        return self.target.join(self.kit_dir, name)

    def _remote(self, name: str) -> str:
        return self.target.join(self.remote_dir, name)

    def _python(self, name: str, role: str, script: str, *args: str) -> list[str]:
        env = self._env(name, role)
        return [
            "env",
            *(f"{k}={v}" for k, v in env.items()),
            *self.target.python(self._kit(script), *args),
        ]

    def _save_manifest(self) -> None:
        self.manifest["processes"] = [
            {
                "name": proc.name,
                "role": role,
                "pid": proc.pid,
                "pgid": proc.pgid,
                "argv": proc.argv,
                "exit_code": proc.exit_code,
                **({"port": self.started.ports[proc.name]} if role == "server" else {}),
            }
            for proc, role in self.started.procs
        ]
        write_manifest(self.run_dir, self.manifest)

    # -- the run ---------------------------------------------------------------------------

    def execute(self) -> RunResult:
        self.run_id, self.run_dir = new_run_dir(
            self.runs_dir, self.scenario.name, self.target.label
        )
        self.manifest = {
            "run_id": self.run_id,
            "usmlab_version": __version__,
            "scenario": self.scenario.name,
            "goal": self.scenario.goal,
            "description": self.scenario.description,
            "parameters": self.params.as_dict(),
            "target": {
                "kind": self.target.kind,
                "spec": self.target.spec,
                "label": self.target.label,
                "identity": str(self.target.identity) if self.target.identity else None,
            },
            "controller": {"host": platform.node(), "python": platform.python_version()},
            "status": "starting",
            "started": now_iso(),
            "ended": None,
            "tracer": self.requested_tracer,
            "trace_clock": None,
        }
        write_manifest(self.run_dir, self.manifest)
        self.progress(f"run folder: {self.run_dir}")
        self._lap_start = time.monotonic()
        status, error = "failed", None
        with _signals_as_interrupts():
            try:
                self._run()
                status = "complete"
            except KeyboardInterrupt:
                status, error = "interrupted", "interrupted by a signal (Ctrl-C or SIGTERM)"
                self.progress("interrupted: stopping every process of the run")
            except UsmlabError as exc:
                status, error = "failed", str(exc)
            finally:
                with _deferred_interrupts():
                    if status != "complete":
                        self._lap(f"until {status}")
                    self._teardown(traffic_ended=status == "complete")
                    self._lap("teardown")
                    self.manifest.update(status=status, ended=now_iso())
                    if error:
                        self.manifest["error"] = error
                    self._collect()
                    self._lap("collect")
        return self._conclude(status, error)

    def _run(self) -> None:
        target, params = self.target, self.params
        facts = self._deploy()
        tracer_name = choose_tracer(self.requested_tracer, target, facts)
        tracer = self.tracer = make_tracer(tracer_name)
        self.tracer_name = tracer_name
        self.manifest["tracer"] = tracer_name
        self._save_manifest()
        self._plan_servers()
        busy = [
            message
            for port in self.server_ports
            if (message := self._port_holder(port, facts if port == params.port else None))
        ]
        if busy:
            raise UsmlabError(busy[0])
        if params.client == "go":
            self._build_go_client()
        self._lap("deploy")

        if params.preexisting:
            # The hypothesis: connections that exist before the tracer attaches.
            self._start_servers()
            self._start_clients()
            self.progress(f"traffic: running {params.preexisting:g} s before the tracer attaches")
            self._sleep(params.preexisting)
            self._start_observers(tracer, facts)
            self._wait_capture()
            self._wait_attached()
        elif tracer is None or tracer.traces_running_processes:
            # The server starts while the reader opens trace_pipe and the tracer loads its
            # probes (bpftrace compiles and attaches for ~0.2 s): its uprobes cover running
            # processes, and the readiness check is a bare TLS handshake, no HTTP to capture.
            # Traffic waits for both.
            self._start_observers(tracer, facts)
            self._start_servers()
            self._lap("server")
            self._wait_capture()
            self._wait_attached()
            self._start_clients()
        else:
            # The seed's order: a tracer that finds processes as they start must be attached
            # before the server starts (field notes §1).
            self._start_observers(tracer, facts)
            self._wait_capture()
            self._wait_attached()
            self._start_servers()
            self._lap("server")
            self._start_clients()
        self._drive_traffic()
        self._lap("client")

    def _deploy(self) -> dict[str, Any]:
        """Upload the kit, clean leftovers, mark the run alive and learn about the target."""
        target = self.target
        self.progress(f"target {target.label}: deploying the lab kit")
        certs = ensure_certs(self.state_dir / "certs")
        files = kit_files()
        files["ca.pem"] = certs.ca_cert
        files["server.pem"] = certs.server_cert
        files["server.key"] = certs.server_key
        self.kit_dir = target.join(target.work_dir, "kit")
        uploaded = target.sync(files, self.kit_dir)
        self.remote_dir = target.run_dir_for(self.run_id, self.run_dir)
        self.manifest["kit"] = {"dir": self.kit_dir, "uploaded": uploaded}
        self.manifest["target"]["run_dir"] = self.remote_dir
        self.manifest["target"]["work_dir"] = target.work_dir
        self._clean_leftovers()
        self._mark_active()
        probe = target.python(self._kit("probe.py"), "info", "--port", str(self.params.port))
        facts: dict[str, Any] = json.loads(target.run(probe).stdout)
        facts["local_run_dir"] = str(self.run_dir)
        # Every later kit script runs on the interpreter the probe ran on, named by its path:
        # the workloads then map the libssl the probe saw, under sudo too.
        target.use_python(facts.get("python_executable"))
        self.manifest["target"].update(
            host=facts["hostname"],
            kernel=facts["kernel"],
            machine=facts["machine"],
            python=facts["python"],
            openssl=facts["openssl"],
            libssl=facts["libssl"],
            btf=facts["btf"],
            bpftrace=facts["bpftrace"],
        )
        return facts

    def _clean_leftovers(self) -> None:
        """End processes of earlier runs that crashed (never anything this run or others own)."""
        ended = [e for e in clean_target(self.target, deploy=False) if "pid" in e]
        if ended:
            self.progress(f"cleanup: ended {len(ended)} leftover process(es) of crashed runs")

    def _mark_active(self) -> None:
        """Create the run folder on the target and, beside it, the marker that tells cleanup
        this run is alive while its lifeline process is (one command: over SSH each is a
        round trip)."""
        target = self.target
        pid = target.lifeline_pid()
        if pid is None:
            target.run(["mkdir", "-p", "--", self.remote_dir])
            return
        self.active_marker = target.join(target.work_dir, "active", self.run_id)
        target.run(
            ["sh", "-c", 'mkdir -p -- "$1" "$2" && printf %s "$3" > "$4"', "sh",
             self.remote_dir, target.join(target.work_dir, "active"),
             json.dumps({"pid": pid, "run_dir": self.remote_dir}), self.active_marker],
        )  # fmt: skip

    def _port_holder(self, port: int, facts: dict[str, Any] | None) -> str | None:
        if facts is not None:
            return facts.get("port_in_use")
        result = self.target.run(
            self.target.python(self._kit("probe.py"), "port", str(port)), check=False
        )
        return (result.stdout.strip() or f"port {port} is in use") if result.exit_code else None

    def _plan_servers(self) -> None:
        params = self.params
        ports = list(params.ports)
        if params.ephemeral_server:
            from usmlab.run.nat import ephemeral_port

            ports = [ephemeral_port(self.target, self.kit_dir)]
            self.progress(f"server: port {ports[0]} is inside the ephemeral port range")
        self.server_ports = ports
        self.manifest["server_ports"] = ports

    def _build_go_client(self) -> None:
        from usmlab.run.go_client import build_go_client

        self.progress("client: building the Go client on the target")
        build = build_go_client(self.target, self.kit_dir, self._kit("goclient"))
        self.go_client = build["path"]
        self.manifest["go_client"] = dict(build)

    def _start_observers(self, tracer: Tracer | None, facts: dict[str, Any]) -> None:
        """Start the trace_pipe reader, the tracer and the thread sampler; `_wait_capture`
        and `_wait_attached` wait until the reader holds trace_pipe and the probes are in."""
        target = self.target
        if tracer is not None:
            self.progress("capture: opening trace_pipe")
            self.capture = TracePipeCapture(target, self.remote_dir, self.kit_dir)
            self.started.add(self.capture.start(self._env("capture", "capture")), "capture")
            # The tracer loads while the reader opens trace_pipe: the reader empties the trace
            # buffer within milliseconds, long before any probe of a loading tracer can fire
            # on lab traffic (no workload runs yet), and traffic waits for both.
            self.progress(f"tracer {tracer.name}: starting, waiting for probes to attach")
            ctx = TracerContext(
                run_id=self.run_id,
                run_dir=self.remote_dir,
                kit_dir=self.kit_dir,
                facts=facts,
                env=self._env("tracer", "tracer"),
                go_binaries=[self.go_client] if self.go_client else [],
                binary=self.usm_debugger,
            )
            proc = self.started.add(tracer.start(target, ctx), "tracer")
            self._save_manifest()
            self._attaching = (tracer, ctx, proc, time.monotonic())
        sampler = self._python(
            "sampler", "sampler", "thread_sampler.py",
            "--run-id", self.run_id, "--out", self._remote("threads.jsonl"),
        )  # fmt: skip
        self.started.add(
            target.start(
                sampler, name="sampler", stdout_path=self._remote("sampler.log"),
                sudo=tracer is not None,
            ),
            "sampler",
        )  # fmt: skip
        if self.tracer_name == "system-probe":
            self._start_sysprobe_fetch()
        self._lap("observers")

    def _wait_capture(self) -> None:
        """Return once the reader started by `_start_observers` holds trace_pipe."""
        if self.capture is None:
            return
        self.capture.wait_ready()
        self._note_capture_state()
        self._lap("capture")

    def _note_capture_state(self) -> None:
        """The manifest says which trace clock ran and what tracefs settings were changed."""
        if self.capture is not None and self.capture.state:
            self.manifest["trace_clock"] = self.capture.clock
            self.manifest["tracefs"] = self.capture.state

    def _wait_attached(self) -> None:
        """Return once the tracer started by `_start_observers` has its probes attached."""
        if self._attaching is None:
            return
        tracer, ctx, proc, t0 = self._attaching
        self._attaching = None
        tracer.wait_attached(self.target, ctx, proc, ATTACH_TIMEOUT, self.abort)
        self.manifest["tracer_attached_mono"] = tracer.attached_mono
        self.manifest["tracer_attached"] = getattr(tracer, "attached_summary", None)
        self.progress(f"tracer {tracer.name}: attached in {time.monotonic() - t0:.1f} s")
        self._lap("attach")

    def _start_sysprobe_fetch(self) -> None:
        """system-probe already runs on the target: collect its stats, start no tracer."""
        from usmlab.run.sysprobe_fetch import DEFAULT_SOCKET, endpoint_urls, start_periodic

        socket = self.sysprobe_socket or DEFAULT_SOCKET
        self.progress(f"system-probe: fetching its stats from {socket}")
        self.sysprobe = start_periodic(
            self.target, self.kit_dir, self.remote_dir, self.run_id, socket=socket,
            env=self._env("sysprobe-fetch", "sysprobe"),
        )  # fmt: skip
        self.started.add(self.sysprobe, "sysprobe")
        self.manifest["sysprobe"] = {"socket": socket, "client_ids": endpoint_urls(self.run_id)}

    def _finish_sysprobe_fetch(self) -> None:
        """Stop the periodic fetch after its round, then take the final dumps."""
        from usmlab.run.sysprobe_fetch import fetch_final, stop_periodic

        assert self.sysprobe is not None
        stop_periodic(self.target, self.sysprobe)
        final = fetch_final(
            self.target, self.kit_dir, self.remote_dir, self.run_id,
            socket=self.manifest["sysprobe"]["socket"],
        )  # fmt: skip
        self.manifest["sysprobe"]["warnings"] = final.warnings

    # -- workloads ---------------------------------------------------------------------------

    def _server_name(self, port: int) -> str:
        return "server" if len(self.server_ports) == 1 else f"server-{port}"

    def _start_servers(self) -> None:
        for port in self.server_ports:
            self._start_server(self._server_name(port), port)
        if self.params.nat_vip:
            self._add_nat()

    def _start_server(self, name: str, port: int) -> BackgroundProcess:
        target, params = self.target, self.params
        argv = self._python(
            name, "server", "server.py",
            "--host", params.host, "--port", str(port), "--name", name,
            "--cert", self._kit("server.pem"), "--key", self._kit("server.key"),
            "--log", self._remote(f"{name}.jsonl"),
        )  # fmt: skip
        server = target.start(argv, name=name, stdout_path=self._remote(f"{name}.log"))
        self.started.add(server, "server", port=port)
        self._save_manifest()
        url = self._url(params.host, port)
        check = target.run(
            [*target.python(self._kit("client.py")), "--check", "-url", url,
             "--timeout", str(READY_TIMEOUT)],
            check=False,
            timeout=READY_TIMEOUT + 10,
        )  # fmt: skip
        if not check.ok:
            code = target.poll(server)
            log = target.read_text(server.stdout_path).strip().splitlines()
            reason = log[-1] if log and code is not None else check.stderr.strip()
            raise UsmlabError(f"{name} did not become ready: {reason}")
        self.progress(f"{name}: ready on {url} (pid {server.pid})")
        return server

    def _add_nat(self) -> None:
        from usmlab.run.nat import NatRule

        vip_host, vip_port = check_url(f"https://{self.params.nat_vip}")
        self.nat = NatRule.add(
            self.target, self.kit_dir, self.remote_dir, self.run_id,
            vip_host, vip_port, self.params.host, self.server_ports[0],
        )  # fmt: skip
        self.manifest["nat"] = {
            "vip": self.params.nat_vip,
            "to": f"{self.params.host}:{self.server_ports[0]}",
        }
        self.progress(f"nat: {self.params.nat_vip} -> {self.params.host}:{self.server_ports[0]}")

    @staticmethod
    def _url(host: str, port: int) -> str:
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    def _client_urls(self) -> list[str]:
        if self.params.nat_vip:
            return [f"https://{self.params.nat_vip}"]
        return [self._url(self.params.host, port) for port in self.server_ports]

    def _client_paths(self, index: int) -> tuple[str, ...]:
        """With several clients, each gets paths of its own, so a capture names its client."""
        if self.params.clients == 1:
            return self.params.paths
        n = index + 1
        return (
            f"/api/v1/namespaces/client-{n}/configmaps",
            f"/api/v1/namespaces/client-{n}/pods",
            f"/api/v1/persistentvolumes/pvc-client-{n}",
        )

    def _start_clients(self, duration: float | None = None, suffix: str = "") -> None:
        params = self.params
        self.clients = []
        for index in range(params.clients):
            name = ("client" if params.clients == 1 else f"client-{index + 1}") + suffix
            self.clients.append(self._start_client(name, index, duration))

    def _start_client(self, name: str, index: int, duration: float | None) -> BackgroundProcess:
        params = self.params
        flags = params.client_args(self._client_urls(), self._client_paths(index))
        if duration is not None:
            flags += ["--duration", f"{duration}"]
        if not params.nat_vip:  # the lab certificate does not name a virtual address
            flags += ["--cacert", self._kit("ca.pem")]
        flags += ["--log", self._remote(f"{name}.jsonl")]
        env = [f"{k}={v}" for k, v in self._env(name, "client").items()]
        if params.client == "go":
            argv = ["env", *env, self.go_client or "", *flags]
        else:
            argv = ["env", *env, *self.target.python(self._kit("client.py"), *flags)]
        client = self.target.start(argv, name=name, stdout_path=self._remote(f"{name}.log"))
        self.started.add(client, "client")
        self._save_manifest()
        return client

    def _drive_traffic(self) -> None:
        """Wait for the clients, showing progress; restart processes when the scenario says."""
        params = self.params
        total = str(params.count * params.clients) if params.count else "∞"
        if not params.count and params.duration is None:
            self.progress("client: running until Ctrl-C (or use --duration)")
        started = time.monotonic()
        restart_due = started + params.restart_after if params.restart else None
        last = started
        while True:
            codes = self.target.poll_many(self.clients)
            if all(code is not None for code in codes):
                break
            self._check_abort()
            time.sleep(0.1)
            now = time.monotonic()
            if restart_due is not None and now >= restart_due:
                restart_due = None
                remaining = None
                if params.duration is not None:
                    remaining = max(0.5, params.duration - (now - started))
                self._restart(remaining)
            if now - last >= PROGRESS_EVERY:
                last = now
                self.progress(f"client: {self._requests_done()}/{total} requests")
        self.progress(f"client: finished (exit {', '.join(str(c) for c in codes)})")
        for client, code in zip(self.clients, codes, strict=True):
            if code == 2:  # the client's usage error: it sent nothing, say why
                lines = self.target.read_text(client.stdout_path).strip().splitlines()
                reason = lines[-1] if lines else "exit status 2"
                raise UsmlabError(f"{client.name} refused its arguments: {reason}")

    def _requests_done(self) -> int:
        names = [
            self._remote(f"{p.name}.jsonl") for p, role in self.started.procs if role == "client"
        ]
        out = self.target.run(["cat", "--", *names], check=False).stdout
        return out.count("\n")

    def _restart(self, remaining: float | None) -> None:
        """Kill and respawn (new PIDs), as a CronJob restart does in production."""
        kind = self.params.restart
        self.restarts += 1
        suffix = f"-r{self.restarts}"
        if kind in ("server", "both"):
            servers = [(p, port) for p, role, port in self._servers() if p.exit_code is None]
            self.target.stop_many([p for p, _ in servers], RESTART_STOP)
            for proc, port in servers:
                base = proc.name.split("-r")[0]
                self._start_server(f"{base}{suffix}", port)
        if kind in ("client", "both"):
            self.target.stop_many(self.clients, RESTART_STOP)
            self._start_clients(remaining, suffix)
        self.progress(f"restart: {kind} respawned with new PIDs")

    def _servers(self) -> list[tuple[BackgroundProcess, str, int]]:
        return [
            (p, role, self.started.ports.get(p.name, 0))
            for p, role in self.started.procs
            if role == "server"
        ]

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._check_abort()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _lap(self, phase: str) -> None:
        """Record how long the phase that just ended took (manifest `phases`, seconds)."""
        now = time.monotonic()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._lap_start, 3)
        self._lap_start = now
        self.manifest["phases"] = self.phases

    def _check_abort(self) -> None:
        if self.abort.is_set():
            raise KeyboardInterrupt

    def _teardown(self, traffic_ended: bool = False) -> None:
        """Stop clients, then servers, then the observers together, then the trace reader.

        Every stage is attempted whatever the others do; the reader goes last so it keeps
        every line the tracer wrote up to its exit. When the clients ended on their own and
        the tracer prints at each probe hit (`stops_early`), nothing it could still print
        concerns the lab: it is told to stop together with the clients, and the reader once
        the servers are down, so the tracer's exit (kernel uprobe teardown, ~0.1 s a probe)
        runs while the servers, the sampler and the reader stop.
        """
        early: list[BackgroundProcess] = []
        if traffic_ended and self.tracer is not None and self.tracer.stops_early:
            early = [p for p, role in self.started.procs if role == "tracer"]
        for stage in sorted({STOP_STAGE[role] for _, role in self.started.procs}):
            procs = [p for p, role in reversed(self.started.procs) if STOP_STAGE[role] == stage]
            try:
                if procs[0].name == "capture" and self.capture is not None:
                    self.capture.stop()
                    self._note_capture_state()  # also when interrupted before it was ready
                elif procs[0].name == "sysprobe-fetch":
                    self._finish_sysprobe_fetch()
                else:
                    self.target.stop_many(procs)
            except Exception as exc:  # noqa: BLE001 - one failed stop must not skip the others
                names = ", ".join(f"{p.name} (pid {p.pid})" for p in procs)
                self.progress(f"warning: could not stop {names}: {exc}")
            if stage == STOP_STAGE["client"] and early:
                with contextlib.suppress(Exception):
                    self.target.signal_many(early, signal.SIGINT)
            if stage == STOP_STAGE["server"] and early and self.capture and self.capture.proc:
                # Everything the tracer had to say about the lab is in the ring buffer: the
                # reader may drain it and restore tracefs while the tracer detaches.
                with contextlib.suppress(Exception):
                    self.target.signal_many([self.capture.proc], signal.SIGTERM)
        if self.capture is not None and self.capture.proc is None:
            self.capture.stop()  # prepared tracefs but the reader never started
        if self.nat is not None:
            try:
                self.nat.remove()
            except Exception as exc:  # noqa: BLE001 - reported; cleanup removes it later
                self.progress(f"warning: could not remove the NAT rule: {exc}")
        with contextlib.suppress(Exception):
            self._save_manifest()
        if self.active_marker:
            with contextlib.suppress(Exception):
                self.target.run(["rm", "-f", "--", self.active_marker], check=False)

    def _collect(self) -> None:
        """Bring every file of the remote run folder home, then record hashes."""
        try:
            self.target.fetch_dir(self.remote_dir, self.run_dir)
        except Exception as exc:  # noqa: BLE001 - keep what is local; the manifest says why
            self.manifest["collect_error"] = str(exc)
        self._client_summary()
        self.manifest["files"] = file_inventory(self.run_dir)
        write_manifest(self.run_dir, self.manifest)

    def _client_summary(self) -> None:
        """Read every client's log once: the summary and the all-failed check share it."""
        self.client_logs = workload_logs(self.run_dir, self.manifest, "client")
        records: list[dict[str, Any]] = []
        for path in self.client_logs:
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        self.client_records = records
        self.manifest["client_summary"] = summarize(records)

    def _conclude(self, status: str, error: str | None) -> RunResult:
        if status == "complete":
            failure = client_failure(self.client_records)
            if failure:
                status, error = "failed", failure
                self.manifest.update(status=status, error=error)
                write_manifest(self.run_dir, self.manifest)
        report = None
        code = 0
        if status != "failed" or self.client_logs:
            try:
                report = analyze_run(self.run_dir)
                write_report(report, self.run_dir)
                self._lap("analysis")
                code = exit_status(report)
                self.manifest["outcome"] = report.outcome
                self.manifest["files"] = file_inventory(self.run_dir)
                write_manifest(self.run_dir, self.manifest)
            except Exception as exc:  # noqa: BLE001 - the run's files are kept regardless
                error = error or f"analysis failed: {type(exc).__name__}: {exc}"
                self.manifest["analysis_error"] = error
                write_manifest(self.run_dir, self.manifest)
                code = 1
        if status == "interrupted":
            code = RunInterrupted.exit_code
        elif status == "failed":
            code = 1
        return RunResult(self.run_dir, status, code, self.manifest, report, error)
