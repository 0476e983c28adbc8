"""What one run's stages share: the run context, the target's facts, the process registry.

A run is a pipeline of small stages (`stages.py`) over one `RunContext`. Every process a stage
starts goes into the context's `ProcessRegistry` with the stage of the teardown that stops it,
so teardown follows the registry, never process names. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usmlab.manifest import Manifest
from usmlab.progress import Progress, Reporter
from usmlab.run.signals import held_signals
from usmlab.scenarios import Params, Scenario
from usmlab.targets.base import BackgroundProcess, Target
from usmlab.tracers import Tracer, TracerContext

if TYPE_CHECKING:
    from usmlab.run.trace_reader import TracePipeCapture

# Teardown stages, in the order they run: traffic first, the processes watching it next, the
# trace reader after every tracer, then what is not a process (the NAT rule, the run marker).
STOP_STAGES = ("client", "server", "sysprobe", "tracer", "capture", "nat", "marker")
# The stage that stops each role ("sampler" watches threads: it stops with the tracers).
ROLE_STAGE = {role: STOP_STAGES.index(role) for role in STOP_STAGES} | {
    "sampler": STOP_STAGES.index("tracer"),
    "maps": STOP_STAGES.index("sysprobe"),  # USM's maps are read while the tracer holds them
}


@dataclass(frozen=True)
class TargetFacts:
    """What the target said about itself before the run (kit/probe.py `info`)."""

    hostname: str
    kernel: str
    machine: str
    python: str
    openssl: str
    libssl: list[str]
    btf: bool
    bpftrace: str | None
    euid: int | None
    port_in_use: str | None
    raw: dict[str, Any]  # everything the probe said, as the tracers read it

    @classmethod
    def from_probe(cls, data: dict[str, Any]) -> TargetFacts:
        return cls(
            hostname=str(data.get("hostname", "")),
            kernel=str(data.get("kernel", "")),
            machine=str(data.get("machine", "")),
            python=str(data.get("python", "")),
            openssl=str(data.get("openssl", "")),
            libssl=list(data.get("libssl") or []),
            btf=bool(data.get("btf")),
            bpftrace=data.get("bpftrace") or None,
            euid=data.get("euid") if isinstance(data.get("euid"), int) else None,
            port_in_use=data.get("port_in_use") or None,
            raw=data,
        )

    def for_manifest(self) -> dict[str, Any]:
        return {
            "host": self.hostname, "kernel": self.kernel, "machine": self.machine,
            "python": self.python, "openssl": self.openssl, "libssl": self.libssl,
            "btf": self.btf, "bpftrace": self.bpftrace,
        }  # fmt: skip


@dataclass
class Started:
    """One thing the run started and must stop: a process, or a change (a NAT rule)."""

    name: str
    role: str
    proc: BackgroundProcess | None = None
    stop: Callable[[], object] | None = None  # its own way to stop; else the target's ladder
    port: int | None = None  # a server's port
    # When the traffic ended on its own: signal sent once the given role's stage is stopped,
    # so a slow exit overlaps the rest of the teardown (docs/architecture.md, "teardown").
    nudge: tuple[str, signal.Signals] | None = None
    retired: bool = False  # stopped on purpose mid-run (a restart): its exit is no news

    @property
    def stage(self) -> int:
        return ROLE_STAGE[self.role]


@dataclass
class ProcessRegistry:
    """Everything the run started, in start order; teardown stops it stage by stage."""

    entries: list[Started] = field(default_factory=list)

    def add(self, entry: Started) -> Started:
        self.entries.append(entry)
        return entry

    def process(self, proc: BackgroundProcess, role: str, **extra: Any) -> BackgroundProcess:
        """Record a started process under its role."""
        self.add(Started(proc.name, role, proc, **extra))
        return proc

    def procs(self, role: str) -> list[BackgroundProcess]:
        return [e.proc for e in self.entries if e.role == role and e.proc is not None]

    def live(self, role: str) -> list[BackgroundProcess]:
        """Processes of a role that no one meant to stop yet."""
        return [
            e.proc for e in self.entries if e.role == role and e.proc is not None and not e.retired
        ]

    def retire(self, procs: list[BackgroundProcess]) -> None:
        """Mark processes as stopped on purpose before they are (a restart)."""
        for entry in self.entries:
            if entry.proc is not None and any(entry.proc is p for p in procs):
                entry.retired = True

    def for_manifest(self) -> list[dict[str, Any]]:
        return [
            {
                "name": e.proc.name, "role": e.role, "pid": e.proc.pid, "pgid": e.proc.pgid,
                "argv": e.proc.argv, "exit_code": e.proc.exit_code,
                **({"port": e.port} if e.role == "server" else {}),
            }
            for e in self.entries
            if e.proc is not None
        ]  # fmt: skip

    def stop_all(self, target: Target, progress: Progress, traffic_ended: bool) -> None:
        """Stop everything, one stage at a time, each entry of a stage together.

        Every stage is attempted whatever the others do. When the traffic ended on its own,
        entries with a `nudge` get their signal as soon as the stage it names is stopped.
        """
        nudges = [e for e in self.entries if traffic_ended and e.nudge and e.proc]
        for stage in sorted({e.stage for e in self.entries}):
            entries = [e for e in reversed(self.entries) if e.stage == stage]
            plain = [e.proc for e in entries if e.stop is None and e.proc is not None]
            for entry in [e for e in entries if e.stop is not None]:
                _attempt(progress, [entry], entry.stop)
            if plain:
                _attempt(progress, entries, lambda plain=plain: target.stop_many(plain))
            for entry in nudges:
                assert entry.nudge is not None and entry.proc is not None
                if ROLE_STAGE[entry.nudge[0]] == stage:
                    with contextlib.suppress(Exception):
                        target.signal_many([entry.proc], entry.nudge[1])


def _attempt(progress: Progress, entries: list[Started], stop: Callable[[], object]) -> None:
    try:
        stop()
    except Exception as exc:  # noqa: BLE001 - one failed stop must not skip the others
        names = ", ".join(f"{e.name} (pid {e.proc.pid})" if e.proc else e.name for e in entries)
        progress(f"warning: could not stop {names}: {exc}")


class Feature:
    """A scenario behaviour (run/features.py): every hook does nothing unless a feature
    overrides it; the stages call each hook at its place."""

    # Name of the start order this feature needs (pipeline.START_ORDERS), or None.
    start_order: str | None = None

    def plan(self, ctx: RunContext) -> None:
        """Before anything starts: choose ports, build binaries."""

    def servers_started(self, ctx: RunContext) -> None:
        """Once every server is ready."""

    def client_urls(self, ctx: RunContext, urls: list[str]) -> list[str]:
        return urls

    def client_paths(self, ctx: RunContext, index: int, paths: tuple[str, ...]) -> tuple[str, ...]:
        return paths

    def client_flags(self, ctx: RunContext, name: str, flags: list[str]) -> list[str]:
        return flags

    def server_program(self, ctx: RunContext, argv: list[str]) -> list[str]:
        """argv of the server program before its flags (default: server.py)."""
        return argv

    def client_program(self, ctx: RunContext, argv: list[str]) -> list[str]:
        """argv of the client program before its flags (default: the Python client)."""
        return argv

    def lead_time(self, ctx: RunContext) -> None:
        """The `lead-time` stage: traffic runs before the tracer attaches."""

    def tick(self, ctx: RunContext, elapsed: float) -> None:
        """Called about every 0.1 s while the traffic runs."""


@dataclass
class RunContext:
    """One run: its ids and folders, the target and its facts, the manifest, the registry."""

    target: Target
    scenario: Scenario
    params: Params
    runs_dir: Path
    state_dir: Path
    progress: Progress
    reporter: Reporter = field(default_factory=Reporter)
    requested_tracer: str = "auto"
    usm_debugger: str | None = None
    sysprobe_socket: str | None = None
    usm_maps_every_ms: int = 50
    abort: threading.Event = field(default_factory=threading.Event)
    # Known once the run folder exists.
    run_id: str = ""
    run_dir: Path = Path()
    manifest: Manifest = field(default_factory=lambda: Manifest(Path()))
    # Known once the kit is deployed.
    kit_dir: str = ""
    remote_dir: str = ""
    facts: TargetFacts | None = None
    active_marker: str | None = None
    # Known once planned.
    tracer_name: str = "none"
    tracer: Tracer | None = None
    features: list[Feature] = field(default_factory=list)
    server_ports: list[int] = field(default_factory=list)
    go_client: str | None = None
    go_server: str | None = None
    # Filled as processes start.
    registry: ProcessRegistry = field(default_factory=ProcessRegistry)
    capture: TracePipeCapture | None = None
    attaching: tuple[TracerContext, BackgroundProcess, float] | None = None
    clients: list[BackgroundProcess] = field(default_factory=list)
    restarts: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    lap_start: float = field(default_factory=time.monotonic)

    # -- names and argv ----------------------------------------------------------------------

    def env(self, name: str, role: str) -> dict[str, str]:
        """The environment every lab process carries: cleanup finds it by USMLAB_RUN_ID."""
        return {"USMLAB_RUN_ID": self.run_id, "USMLAB_NAME": name, "USMLAB_ROLE": role}

    def kit(self, name: str) -> str:
        return self.target.join(self.kit_dir, name)

    def remote(self, name: str) -> str:
        return self.target.join(self.remote_dir, name)

    def with_env(self, name: str, role: str, argv: list[str]) -> list[str]:
        return ["env", *(f"{k}={v}" for k, v in self.env(name, role).items()), *argv]

    def start(
        self, argv: list[str], *, name: str, role: str, sudo: bool = False, **extra: Any
    ) -> BackgroundProcess:
        """Start a lab process and record it, with signals held back in between: once a
        process exists it is in the registry, so teardown stops it (docs/architecture.md)."""
        with held_signals():
            proc = self.target.start(
                argv, name=name, stdout_path=self.remote(f"{name}.log"), sudo=sudo
            )
            self.registry.process(proc, role, **extra)
        self.save_manifest()
        return proc

    def kit_script(self, name: str, role: str, script: str, *args: str) -> list[str]:
        """argv of a kit script run as a lab process `name` of `role`."""
        return self.with_env(name, role, self.target.python(self.kit(script), *args))

    # -- bookkeeping -------------------------------------------------------------------------

    def save_manifest(self) -> None:
        self.manifest["processes"] = self.registry.for_manifest()
        self.manifest.save()

    def lap(self, phase: str) -> None:
        """Record how long the phase that just ended took (manifest `phases`, seconds)."""
        now = time.monotonic()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self.lap_start, 3)
        self.lap_start = now
        self.manifest["phases"] = self.phases

    def check_abort(self) -> None:
        """A controller running several targets stops this run through `abort`."""
        if self.abort.is_set():
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_abort()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def note_capture_state(self) -> None:
        """The manifest says which trace clock ran and what tracefs settings were changed."""
        if self.capture is not None and self.capture.state:
            self.manifest["trace_clock"] = self.capture.clock
            self.manifest["tracefs"] = self.capture.state
