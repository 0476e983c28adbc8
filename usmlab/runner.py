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
from usmlab.analysis.report import analyze_run, exit_status, write_report
from usmlab.certs import ensure_certs
from usmlab.errors import RunInterrupted, UsmlabError
from usmlab.kit import kit_files
from usmlab.rundir import file_inventory, new_run_dir, now_iso, write_manifest
from usmlab.scenarios import Params, Scenario
from usmlab.targets.base import BackgroundProcess, Target
from usmlab.trace_capture import TracePipeCapture
from usmlab.tracers import Tracer, TracerContext
from usmlab.tracers.builtin import BuiltinTracer
from usmlab.workloads.client import summarize

Progress = Callable[[str], None]

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

    def add(self, proc: BackgroundProcess, role: str) -> BackgroundProcess:
        self.procs.append((proc, role))
        return proc


def choose_tracer(requested: str, target: Target, facts: dict[str, Any]) -> str:
    """`auto` means builtin when the target can run eBPF as root, else none."""
    if requested != "auto":
        return requested
    can_root = facts.get("euid") == 0 or (
        facts.get("sudo") and target.run(["true"], sudo=True, check=False).ok
    )
    if can_root and facts.get("btf") and facts.get("bpftrace"):
        return "builtin"
    return "none"


def make_tracer(name: str) -> Tracer | None:
    if name == "builtin":
        return BuiltinTracer()
    if name == "none":
        return None
    raise UsmlabError(f"unknown tracer {name!r}: use builtin or none", exit_code=2)


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
        self.manifest: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _env(self, name: str, role: str) -> dict[str, str]:
        return {"USMLAB_RUN_ID": self.run_id, "USMLAB_NAME": name, "USMLAB_ROLE": role}

    def _kit(self, name: str) -> str:
        return self.target.join(self.kit_dir, name)

    def _remote(self, name: str) -> str:
        return self.target.join(self.remote_dir, name)

    def _python(self, name: str, role: str, script: str, *args: str) -> list[str]:
        env = self._env(name, role)
        return ["env", *(f"{k}={v}" for k, v in env.items()), "python3", self._kit(script), *args]

    def _save_manifest(self) -> None:
        self.manifest["processes"] = [
            {
                "name": proc.name,
                "role": role,
                "pid": proc.pid,
                "pgid": proc.pgid,
                "argv": proc.argv,
                "exit_code": proc.exit_code,
                **({"port": self.params.port} if role == "server" else {}),
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
            "target": {"kind": self.target.kind, "label": self.target.label},
            "controller": {"host": platform.node(), "python": platform.python_version()},
            "status": "starting",
            "started": now_iso(),
            "ended": None,
            "tracer": self.requested_tracer,
            "trace_clock": None,
        }
        write_manifest(self.run_dir, self.manifest)
        self.progress(f"run folder: {self.run_dir}")
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
                    self._teardown()
                    self.manifest.update(status=status, ended=now_iso())
                    if error:
                        self.manifest["error"] = error
                    self._collect()
        return self._conclude(status, error)

    def _run(self) -> None:
        target, params = self.target, self.params
        self.progress(f"target {target.label}: deploying the lab kit")
        certs = ensure_certs(self.state_dir / "certs")
        files = kit_files()
        files["ca.pem"] = certs.ca_cert
        files["server.pem"] = certs.server_cert
        files["server.key"] = certs.server_key
        self.kit_dir = target.join(target.work_dir, "kit")
        uploaded = target.sync(files, self.kit_dir)
        self.remote_dir = target.run_dir_for(self.run_id, self.run_dir)
        target.run(["mkdir", "-p", "--", self.remote_dir])
        self.manifest["kit"] = {"dir": self.kit_dir, "uploaded": uploaded}
        self.manifest["target"]["run_dir"] = self.remote_dir
        self._clean_leftovers()
        self._mark_active()

        port = params.port
        probe = ["python3", self._kit("probe.py"), "info", "--port", str(port)]
        facts = json.loads(target.run(probe).stdout)
        facts["local_run_dir"] = str(self.run_dir)
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
        tracer_name = choose_tracer(self.requested_tracer, target, facts)
        tracer = make_tracer(tracer_name)
        self.manifest["tracer"] = tracer_name
        self._save_manifest()

        if facts.get("port_in_use"):
            raise UsmlabError(facts["port_in_use"])

        if tracer is not None:
            self.progress("capture: opening trace_pipe")
            self.capture = TracePipeCapture(target, self.remote_dir, self.kit_dir)
            self.started.add(self.capture.start(self._env("capture", "capture")), "capture")
            self.manifest["trace_clock"] = self.capture.clock
            self.manifest["tracefs"] = self.capture.state
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
        if tracer is not None:
            self.progress(f"tracer {tracer.name}: starting, waiting for probes to attach")
            ctx = TracerContext(
                run_id=self.run_id,
                run_dir=self.remote_dir,
                kit_dir=self.kit_dir,
                facts=facts,
                env=self._env("tracer", "tracer"),
            )
            proc = self.started.add(tracer.start(target, ctx), "tracer")
            self._save_manifest()
            t0 = time.monotonic()
            tracer.wait_attached(target, ctx, proc, ATTACH_TIMEOUT)
            self.progress(f"tracer {tracer.name}: attached in {time.monotonic() - t0:.1f} s")

        self._start_server()
        self._run_client()

    def _clean_leftovers(self) -> None:
        """End processes of earlier runs that crashed (never anything this run or others own)."""
        argv = ["python3", self._kit("cleanup.py"), "--work-dir", self.target.work_dir]
        can_sudo = self.target.run(["true"], sudo=True, check=False).ok
        result = self.target.run(argv, sudo=can_sudo, check=False)
        ended = [ln for ln in result.stdout.splitlines() if '"pid"' in ln]
        if ended:
            self.progress(f"cleanup: ended {len(ended)} leftover process(es) of crashed runs")

    def _mark_active(self) -> None:
        """The marker that tells cleanup this run is alive while its lifeline process is."""
        pid = self.target.lifeline_pid()
        if pid is None:
            return
        marker = self.run_dir / ".active"
        marker.write_text(json.dumps({"pid": pid, "run_dir": self.remote_dir}))
        self.active_marker = self.target.join(self.target.work_dir, "active", self.run_id)
        self.target.run(["mkdir", "-p", "--", self.target.join(self.target.work_dir, "active")])
        self.target.put(marker, self.active_marker)
        marker.unlink()

    def _start_server(self) -> None:
        target, params = self.target, self.params
        argv = self._python(
            "server", "server", "server.py",
            "--host", params.host, "--port", str(params.port),
            "--cert", self._kit("server.pem"), "--key", self._kit("server.key"),
            "--log", self._remote("server.jsonl"),
        )  # fmt: skip
        server = target.start(argv, name="server", stdout_path=self._remote("server.log"))
        self.started.add(server, "server")
        self._save_manifest()
        check = target.run(
            ["python3", self._kit("client.py"), "--check", "-url", params.url,
             "--timeout", str(READY_TIMEOUT)],
            check=False,
            timeout=READY_TIMEOUT + 10,
        )  # fmt: skip
        if not check.ok:
            code = target.poll(server)
            log = target.read_text(server.stdout_path).strip().splitlines()
            reason = log[-1] if log and code is not None else check.stderr.strip()
            raise UsmlabError(f"server did not become ready: {reason}")
        self.progress(f"server: ready on {params.url} (pid {server.pid})")

    def _run_client(self) -> None:
        target, params = self.target, self.params
        argv = self._python(
            "client", "client", "client.py", *params.client_args(),
            "--cacert", self._kit("ca.pem"), "--log", self._remote("client.jsonl"),
        )  # fmt: skip
        client = target.start(argv, name="client", stdout_path=self._remote("client.log"))
        self.started.add(client, "client")
        self._save_manifest()
        total = str(params.count) if params.count else "∞"
        if not params.count and params.duration is None:
            self.progress("client: running until Ctrl-C (or use --duration)")
        last = time.monotonic()
        while (code := target.poll(client)) is None:
            time.sleep(0.1)
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                done = target.run(
                    ["wc", "-l", self._remote("client.jsonl")], check=False
                ).stdout.split()
                self.progress(f"client: {done[0] if done else 0}/{total} requests")
        self.progress(f"client: finished (exit {code})")

    def _teardown(self) -> None:
        """Stop in reverse start order; every step is attempted whatever the others do."""
        for proc, role in reversed(self.started.procs):
            try:
                if role == "capture" and self.capture is not None:
                    self.capture.stop()
                else:
                    self.target.stop(proc)
            except Exception as exc:  # noqa: BLE001 - one failed stop must not skip the others
                self.progress(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}")
        if self.capture is not None and self.capture.proc is None:
            self.capture.stop()  # prepared tracefs but the reader never started
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
        records = []
        path = self.run_dir / "client.jsonl"
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        self.manifest["client_summary"] = summarize(records)

    def _conclude(self, status: str, error: str | None) -> RunResult:
        report = None
        code = 0
        if status != "failed" or (self.run_dir / "client.jsonl").exists():
            try:
                report = analyze_run(self.run_dir)
                write_report(report, self.run_dir)
                code = exit_status(report)
                self.manifest["outcome"] = report.outcome
                self.manifest["files"] = file_inventory(self.run_dir)
                write_manifest(self.run_dir, self.manifest)
            except Exception as exc:  # noqa: BLE001 - the run's files are kept regardless
                error = error or f"analysis failed: {exc}"
        if status == "interrupted":
            code = RunInterrupted.exit_code
        elif status == "failed":
            code = 1
        return RunResult(self.run_dir, status, code, self.manifest, report, error)
