"""One lab run as a pipeline: prepare, start in one of the start orders, stop, collect, analyze.

The stages are small functions of one `RunContext` (`stages.py`); which ones run, and in which
order, is data (`START_ORDERS`), chosen from the tracer and the scenario's features. Whatever
happens (an error, Ctrl-C, SIGTERM), teardown stops everything in the context's registry, stage
by stage (by process group, never by name), restores tracefs, and keeps every file, with the
manifest saying whether the run was complete, interrupted or failed. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usmlab import __version__
from usmlab.analysis.html import write_html_later
from usmlab.analysis.report import Report, analyze_run, exit_status, write_report
from usmlab.errors import EXIT_FAILED, RunInterrupted, UsmlabError
from usmlab.jsonlines import iter_jsonl
from usmlab.kit.client import RunningSummary
from usmlab.manifest import Manifest, new_run_dir, now_iso, process_start
from usmlab.progress import Progress, Reporter
from usmlab.run import stages
from usmlab.run.cleanup import clean_target
from usmlab.run.collect import fetch_run_files
from usmlab.run.context import RunContext
from usmlab.run.features import features_for
from usmlab.run.signals import signals_as_interrupts, signals_noted
from usmlab.scenarios import Params, Scenario
from usmlab.targets.base import Target

Stage = Callable[[RunContext], None]

TEARDOWN_NOTICE = "usmlab: stopping the run's processes and restoring tracefs; finishing first"

STAGES: dict[str, Stage] = {
    "deploy": stages.deploy,
    "choose-tracer": stages.choose_tracer,
    "plan": stages.plan,
    "capture": stages.claim_trace_pipe,
    "observers": stages.start_observers,
    "attached": stages.attached,
    "servers": stages.start_servers,
    "clients": stages.start_clients,
    "lead-time": stages.lead_time,
    "traffic": stages.traffic,
}

# Every run starts with these; the tracer they choose and the scenario pick the start order.
PREPARE = ("deploy", "choose-tracer", "plan")
# trace_pipe is always claimed before any tracer starts (`capture`).
START_ORDERS: dict[str, tuple[str, ...]] = {
    # uprobes on a library file cover running processes: the server starts while the tracer
    # attaches (its readiness check is a bare handshake, nothing to capture); traffic waits.
    "server-during-attach": ("capture", "observers", "servers", "attached", "clients", "traffic"),
    # a tracer that finds processes as they load libssl (usm-debugger) is attached first.
    "attach-first": ("capture", "observers", "attached", "servers", "clients", "traffic"),
    # the `preexisting` hypothesis: connections older than the tracer.
    "traffic-first": (
        "servers", "clients", "lead-time", "capture", "observers", "attached", "traffic",
    ),
}  # fmt: skip


def start_order(ctx: RunContext) -> str:
    """The start order for this run: a feature's, else the tracer's."""
    for feature in ctx.features:
        if feature.start_order:
            return feature.start_order
    if ctx.tracer is None or ctx.tracer.traces_running_processes:
        return "server-during-attach"
    return "attach-first"


@dataclass
class RunResult:
    run_dir: Path
    status: str
    exit_code: int
    manifest: dict[str, Any]
    report: Report | None = None
    error: str | None = None


def read_clients(logs: list[Path]) -> tuple[dict[str, Any], str | None]:
    """Every client's log read once, as a stream (a day-long run's logs need not fit in
    memory): the client summary, and why no request succeeded (None when one did)."""
    summary = RunningSummary()
    first: dict[str, Any] | None = None
    for path in logs:
        with contextlib.suppress(UsmlabError):  # the analysis names a corrupt log
            for _, record in iter_jsonl(path):
                summary.add(record)
                first = first or record
    if summary.ok or first is None:
        return summary.result(), None
    reason = first.get("error") or f"status {first.get('status')}"
    return summary.result(), f"none of the {summary.sent} requests succeeded: {reason}"


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
        stages: dict[str, Stage] | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self.ctx = RunContext(
            target=target,
            scenario=scenario,
            params=params,
            runs_dir=runs_dir,
            state_dir=state_dir,
            progress=progress,
            requested_tracer=tracer,
            usm_debugger=usm_debugger,
            sysprobe_socket=sysprobe_socket,
            features=features_for(params),
            reporter=reporter or Reporter(progress),
        )
        self.stages = stages or STAGES  # a test may swap stages for its own

    @property
    def abort(self) -> threading.Event:
        """Set by a controller running several targets at once: the run stops as on Ctrl-C."""
        return self.ctx.abort

    def execute(self) -> RunResult:
        ctx = self.ctx
        ctx.run_id, ctx.run_dir = new_run_dir(ctx.runs_dir, ctx.scenario.name, ctx.target.label)
        ctx.manifest = Manifest(ctx.run_dir, self._first_manifest())
        ctx.manifest.save()
        ctx.progress(f"run folder: {ctx.run_dir}")
        ctx.lap_start = time.monotonic()
        status, error = "failed", None
        with signals_as_interrupts():
            try:
                self.run_stages()
                status = "complete"
            except KeyboardInterrupt:
                status, error = "interrupted", "interrupted by a signal (Ctrl-C or SIGTERM)"
                ctx.progress("interrupted: stopping every process of the run")
            except UsmlabError as exc:
                status, error = "failed", str(exc)
            finally:
                with signals_noted(ctx.progress, TEARDOWN_NOTICE):
                    if status != "complete":
                        ctx.lap(f"until {status}")
                    self.teardown(traffic_ended=status == "complete", sweep=status != "complete")
                    ctx.lap("teardown")
                    ctx.manifest.update(status=status, ended=now_iso())
                    if error:
                        ctx.manifest["error"] = error
                    self.collect()
                    ctx.lap("collect")
        return self.conclude(status, error)

    def run_stages(self) -> None:
        """The prepare stages, then the start order they lead to."""
        for name in PREPARE:
            self.stages[name](self.ctx)
        order = start_order(self.ctx)
        self.ctx.manifest["start_order"] = order
        for name in START_ORDERS[order]:
            self.stages[name](self.ctx)

    def _first_manifest(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "run_id": ctx.run_id,
            "usmlab_version": __version__,
            "scenario": ctx.scenario.name,
            "goal": ctx.scenario.goal,
            "description": ctx.scenario.description,
            "parameters": ctx.params.as_dict(),
            "target": {
                "kind": ctx.target.kind,
                "spec": ctx.target.spec,
                "label": ctx.target.label,
                "identity": str(ctx.target.identity) if ctx.target.identity else None,
            },
            "controller": {
                "host": platform.node(),
                "python": platform.python_version(),
                "pid": os.getpid(),
                "start": process_start(os.getpid()),
            },
            "status": "starting",
            "started": now_iso(),
            "ended": None,
            "tracer": ctx.requested_tracer,
            "trace_clock": None,
        }

    def teardown(self, traffic_ended: bool = False, sweep: bool = False) -> None:
        """Stop everything the registry holds, stage by stage (context.STOP_STAGES).

        After a run that did not complete, `sweep` also ends anything on the target that still
        carries this run's USMLAB_RUN_ID, whatever the registry knows: the last word on leaks.
        """
        ctx = self.ctx
        ctx.registry.stop_all(ctx.target, ctx.progress, traffic_ended)
        if sweep and ctx.kit_dir:
            try:
                ended = [e for e in clean_target(ctx.target, ctx.run_id, ending=True) if "pid" in e]
            except Exception as exc:  # noqa: BLE001 - reported; `usmlab cleanup` can do it later
                ctx.progress(f"warning: could not sweep the run's processes: {exc}")
            else:
                if ended:
                    ctx.progress(f"cleanup: ended {len(ended)} process(es) the run had left")
        with contextlib.suppress(Exception):
            ctx.save_manifest()

    def collect(self) -> None:
        """Bring every file of the remote run folder home, then record hashes."""
        ctx = self.ctx
        try:
            fetch_run_files(ctx.target, ctx.remote_dir, ctx.run_dir, ctx.reporter)
        except Exception as exc:  # noqa: BLE001 - keep what is local; the manifest says why
            ctx.manifest["collect_error"] = str(exc)
        ctx.manifest.inventory()
        ctx.manifest.save()

    def conclude(self, status: str, error: str | None) -> RunResult:
        """The client summary, the all-failed check and the verdict, into the manifest."""
        ctx = self.ctx
        client_logs = ctx.manifest.client_logs
        ctx.manifest["client_summary"], failure = read_clients(client_logs)
        if status == "complete" and failure:
            status, error = "failed", failure
            ctx.manifest.update(status=status, error=error)
        ctx.manifest.save()
        report = None
        code = 0
        sent = ctx.manifest["client_summary"]["sent"]
        if status == "interrupted" and not sent:
            # Nothing was sent: a verdict (no-captures, with tracer hints) would judge nothing.
            error = "interrupted before any request was sent: nothing to judge"
            ctx.manifest["error"] = error
            ctx.manifest.save()
        elif status != "failed" or client_logs:
            try:
                report = analyze_run(ctx.run_dir)
                write_report(report, ctx.run_dir)
                write_html_later(ctx.run_dir)
                ctx.lap("analysis")
                code = exit_status(report)
                ctx.manifest["outcome"] = report.outcome
                ctx.manifest.inventory()
                ctx.manifest.save()
            except Exception as exc:  # noqa: BLE001 - the run's files are kept regardless
                error = error or f"analysis failed: {type(exc).__name__}: {exc}"
                ctx.manifest["analysis_error"] = error
                ctx.manifest.save()
                code = EXIT_FAILED
        if status == "interrupted":
            code = RunInterrupted.exit_code
        elif status == "failed":
            code = EXIT_FAILED
        return RunResult(ctx.run_dir, status, code, ctx.manifest, report, error)
