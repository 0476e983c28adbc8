"""One scenario on several targets at once, one run folder each, one aggregated verdict.

Each target runs in its own thread through the same LabRun as a single run. Ctrl-C or SIGTERM
reaches the main thread only, so it sets every run's abort flag and each run stops its own
processes and keeps its files, exactly as a single interrupted run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from usmlab.errors import (
    EXIT_CLEAN,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISATTRIBUTION,
    EXIT_NO_CAPTURES,
    EXIT_USAGE,
    UsageError,
    UsmlabError,
)
from usmlab.run.pipeline import LabRun, RunResult
from usmlab.scenarios import Params, Scenario
from usmlab.targets import open_target

# Worst first: an interrupted fleet, a host whose run failed (its verdict is unknown), a usage
# error, then misattribution, then no captures, then clean.
_SEVERITY = {
    EXIT_INTERRUPTED: 6, EXIT_FAILED: 5, EXIT_USAGE: 4, EXIT_MISATTRIBUTION: 3,
    EXIT_NO_CAPTURES: 2, EXIT_CLEAN: 0,
}  # fmt: skip


def worst_exit(codes: list[int]) -> int:
    return max(codes, key=lambda code: _SEVERITY.get(code, 5), default=0)


def read_hosts_file(path: Path) -> list[str]:
    """One target spec per line; blank lines and `#` comments are ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read hosts file {path}: {exc.strerror}") from None
    specs = [ln.split("#", 1)[0].strip() for ln in lines]
    specs = [s for s in specs if s]
    if not specs:
        raise UsageError(f"hosts file {path} names no target")
    return specs


@dataclass
class HostResult:
    spec: str
    result: RunResult | None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        return self.result.exit_code if self.result else EXIT_FAILED


def params_for(params: Params, index: int) -> Params:
    """Target i serves on port + i, so targets that share a machine do not collide."""
    if index == 0:
        return params
    host, port = params.host, params.port
    netloc = f"[{host}]" if ":" in host else host
    return dataclasses.replace(params, url=f"https://{netloc}:{port + index}")


def run_fleet(
    specs: list[str],
    scenario: Scenario,
    params: Params,
    *,
    runs_dir: Path,
    tracer: str,
    state_dir: Path,
    sysprobe_socket: str | None = None,
    usm_debugger: str | None = None,
    identity: Path | None = None,
    work_dir: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[HostResult]:
    if len(set(specs)) != len(specs):
        raise UsageError("the same target is named twice")
    targets = [open_target(spec, identity, work_dir) for spec in specs]
    runs = [
        LabRun(
            target,
            scenario,
            params_for(params, i),
            runs_dir=runs_dir,
            tracer=tracer,
            state_dir=state_dir,
            sysprobe_socket=sysprobe_socket,
            usm_debugger=usm_debugger,
            progress=lambda message, label=target.label: progress(f"[{label}] {message}"),
        )
        for i, target in enumerate(targets)
    ]
    results: list[HostResult] = []
    previous = signal.getsignal(signal.SIGTERM)

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            futures: list[Future[RunResult]] = [pool.submit(run.execute) for run in runs]
            try:
                for future in futures:
                    while not future.done():
                        with contextlib.suppress(TimeoutError):
                            future.result(timeout=0.2)
            except KeyboardInterrupt:
                progress("interrupted: stopping every target's run")
                for run in runs:
                    run.abort.set()
            for spec, future in zip(specs, futures, strict=True):
                try:
                    results.append(HostResult(spec, future.result()))
                except UsmlabError as exc:
                    results.append(HostResult(spec, None, str(exc)))
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        for target in targets:
            with contextlib.suppress(Exception):
                target.close()
    return results


def fleet_table(results: list[HostResult]) -> str:
    """The aggregated verdict: one line per target."""
    header = f"{'target':<28} {'status':<11} {'outcome':<16} sent  client  miss.  missed  exit"
    lines = [header, "-" * len(header)]
    for r in results:
        report = r.result.report if r.result else None
        req = getattr(report, "requests", None) or {}
        status = r.result.status if r.result else "failed"
        outcome = getattr(report, "outcome", None) or (r.error or "-")[:16]
        lines.append(
            f"{r.spec:<28} {status:<11} {outcome:<16} {req.get('sent', 0):>4} "
            f"{req.get('captured_client', 0):>7} {req.get('misattributed', 0):>6} "
            f"{req.get('missed', 0):>7} {r.exit_code:>5}"
        )
    return "\n".join(lines)
