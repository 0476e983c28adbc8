"""Tracers: the eBPF programs whose trace_pipe output the analysis judges.

A tracer is started as root in the background before any workload, and traffic starts only once
it reports that its probes are attached (docs/architecture.md: why the start order matters).
`TRACERS` is the one list of tracer names; a new tracer is a module here and one line in it.
"""

from __future__ import annotations

import importlib
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from usmlab.errors import UsageError, UsmlabError
from usmlab.targets.base import BackgroundProcess, Target

if TYPE_CHECKING:
    from usmlab.scenarios import Params

# Every tracer by its --tracer name: the class that starts it, or None when usmlab starts nothing
# (system-probe already runs on the target and its stats are fetched; none: no eBPF).
TRACERS: dict[str, str | None] = {
    "builtin": "usmlab.tracers.builtin:BuiltinTracer",
    "usm-debugger": "usmlab.tracers.usm_debugger:UsmDebuggerTracer",
    # usm-model[:KEY[:read-socket]]: the built-in tracer plus a model of USM's Go-TLS caches
    # (or, with no Go program in the run, of its OpenSSL cache)
    "usm-model": "usmlab.tracers.usm_model:UsmModelTracer",
    "none": None,
    "system-probe": None,
}
TRACER_NAMES = tuple(TRACERS)
TRACER_CHOICES = ("auto", *TRACER_NAMES)  # auto: builtin when the target can run it, else none


def check_tracer_name(name: str) -> str:
    """The name, or a one-line usage error listing the choices."""
    choices = ("auto", *TRACERS)
    if name.startswith("usm-model:"):
        from usmlab.tracers.usm_model import parse_model_spec

        parse_model_spec(name)
        return name
    if name not in choices:
        raise UsageError(f"unknown tracer {name!r}: use {', '.join(choices)}")
    return name


def check_tracer_fits(name: str, params: Params) -> None:
    """A usage error, before anything is deployed, for a tracer the run's workloads cannot
    have: a Go-only usm-model key when no Go program runs (the OpenSSL cache is modelled)."""
    if name.startswith("usm-model") and params.client != "go" and params.server != "go":
        from usmlab.tracers.usm_model import check_openssl_spec, parse_model_spec

        check_openssl_spec(*parse_model_spec(name))


def make_tracer(name: str) -> Tracer | None:
    """The tracer to start for a --tracer name; None when usmlab starts no tracer."""
    where = TRACERS[check_tracer_name(name).split(":")[0]] if name != "auto" else None
    if where is None:
        return None
    module, _, cls = where.partition(":")
    factory = getattr(importlib.import_module(module), cls)
    tracer: Tracer = factory(name) if ":" in name else factory()
    return tracer


@dataclass
class TracerContext:
    """What a tracer needs to know about the run it serves."""

    run_id: str
    run_dir: str  # on the target
    kit_dir: str  # on the target
    facts: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    go_binaries: list[str] = field(default_factory=list)  # Go programs to probe too
    binary: str | None = None  # the tracer's own program, when it is not on PATH (usm-debugger)


class Tracer(ABC):
    name: str = "abstract"
    log_name: str = "tracer.log"
    attached_mono: float | None = None  # target CLOCK_MONOTONIC when probes were attached
    # Whether the tracer may be told to stop as soon as the traffic has ended, its exit then
    # overlapping the rest of the teardown: true when everything it reports is written at the
    # moment of the probe hit (bpf_trace_printk), false when it may still flush buffered events.
    stops_early: bool = False
    # Whether processes already running when the probes attach are traced too: true for
    # uprobes placed on a library file (every process mapping it is covered), false for a
    # tracer that finds processes as they load the library (USM watches library opens), for
    # which the workloads must start after the attach (docs/architecture.md).
    traces_running_processes: bool = False
    attach_poll_seconds: float = 0.1  # how often `attached` is asked

    def manifest_facts(self) -> dict[str, object]:
        """What the manifest should say about this tracer's settings."""
        return {}

    @abstractmethod
    def start(self, target: Target, ctx: TracerContext) -> BackgroundProcess:
        """Start the tracer detached; returns once it is running, not yet attached."""

    @abstractmethod
    def attached(self, target: Target, ctx: TracerContext, proc: BackgroundProcess) -> bool:
        """True once every probe is attached."""

    def wait_attached(
        self,
        target: Target,
        ctx: TracerContext,
        proc: BackgroundProcess,
        timeout: float,
        abort: threading.Event | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not self.attached(target, ctx, proc):
            if abort is not None and abort.is_set():
                raise KeyboardInterrupt
            code = target.poll(proc)
            if code is not None:
                raise UsmlabError(
                    f"{self.name} tracer exited with status {code} before attaching: "
                    f"{self.last_error(target, ctx)}"
                )
            if time.monotonic() > deadline:
                raise UsmlabError(
                    f"{self.name} tracer did not attach within {timeout:.0f} s: "
                    f"{self.last_error(target, ctx)}"
                )
            time.sleep(self.attach_poll_seconds)

    def last_error(self, target: Target, ctx: TracerContext) -> str:
        """The most telling line of the tracer's log, for one-line errors."""
        log = target.run(["cat", "--", target.join(ctx.run_dir, self.log_name)], check=False)
        lines = [ln.strip() for ln in log.stdout.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln and "RLIMIT_MEMLOCK" not in ln]
        if errors:
            return errors[-1]
        return lines[-1] if lines else "no output (see tracer.log)"
