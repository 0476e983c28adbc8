"""Collect system-probe's stats during a run: a periodic fetcher on the target, then a last fetch.

The fetching itself is the kit script `sysprobe_fetch.py` (stdlib, runs as root on the target);
this module starts it, waits for its first round, stops it and runs the final fetch.

Every endpoint is read with a `client_id` of its own, unique to the run: system-probe keeps
per-client state and hands each client only what changed since that client's previous read
(`GetActiveConnections(clientID)`), so two endpoints sharing an id, or usmlab sharing the
process-agent's, would steal each other's stats. The first round registers the ids: stats
are kept for them from then on, which is why traffic should start after `start_periodic`
returns. The files are therefore deltas, summed by usmlab/sysprobe/verdict.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from usmlab.analysis.sysprobe_parse import CONNECTIONS_DUMP, HTTP_DUMPS
from usmlab.errors import UsmlabError
from usmlab.jsonlines import parse_json_lines
from usmlab.targets.base import BackgroundProcess, Target, term_then_kill

DEFAULT_SOCKET = "/opt/datadog-agent/run/sysprobe.sock"
SUBDIR = "sysprobe"  # in the run folder
KIT_SCRIPT = "sysprobe_fetch.py"
LOG_NAME = "fetch.log"
FETCH_EVERY = 10.0  # seconds; system-probe forgets a client that has not read for 2 minutes
FIRST_ROUND_TIMEOUT = 120.0  # a busy host's connections dump takes a while
# The fetcher finishes the round in progress on SIGTERM (an aborted read loses that delta).
STOP_SEQUENCE = term_then_kill(120.0)

ENDPOINT_PATHS: dict[str, str] = {
    "http_monitoring": "/network_tracer/debug/http_monitoring",
    "http2_monitoring": "/network_tracer/debug/http2_monitoring",
    CONNECTIONS_DUMP: "/network_tracer/connections",
}
assert set(HTTP_DUMPS) <= set(ENDPOINT_PATHS)


@dataclass
class SysprobeFiles:
    """What a fetch left on the target: dump files (remote paths) and one-line warnings."""

    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def endpoint_urls(run_id: str) -> dict[str, str]:
    """URL path per endpoint, each with this run's own client_id."""
    return {
        name: f"{path}?client_id={quote(f'usmlab-{run_id}-{name}', safe='')}"
        for name, path in ENDPOINT_PATHS.items()
    }


def _argv(
    kit_dir: str, target: Target, out_dir: str, run_id: str, socket: str, suffix: str
) -> list[str]:
    argv = target.python(target.join(kit_dir, KIT_SCRIPT), "--socket", socket)
    for name, url in endpoint_urls(run_id).items():
        argv += ["--path", url, "--out", target.join(out_dir, f"{name}{suffix}")]
    return argv


def _log_lines(target: Target, log_path: str) -> list[str]:
    result = target.run(["cat", "--", log_path], sudo=True, check=False)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _last_error(lines: list[str]) -> str:
    said = [line for line in lines if line.startswith(("error:", "warning:"))]
    if said:
        return said[-1].split(":", 1)[1].strip()
    return lines[-1] if lines else "no output"


def start_periodic(
    target: Target,
    kit_dir: str,
    remote_run_dir: str,
    run_id: str,
    every: float = FETCH_EVERY,
    socket: str = DEFAULT_SOCKET,
    env: dict[str, str] | None = None,
    timeout: float = FIRST_ROUND_TIMEOUT,
) -> BackgroundProcess:
    """Start the fetcher as root; returns once its first round is on disk.

    `env` (the runner's USMLAB_RUN_ID/NAME/ROLE) is put on the command line through `env`,
    not in the environment: sudo resets the environment, and cleanup finds a crashed run's
    processes by those variables. Fails in one line when system-probe is not there (socket
    missing: the fetcher exits 3).
    """
    out_dir = target.join(remote_run_dir, SUBDIR)
    target.run(["mkdir", "-p", "--", out_dir])
    log_path = target.join(out_dir, LOG_NAME)
    argv = _argv(kit_dir, target, out_dir, run_id, socket, ".json")
    argv += ["--every", f"{every:g}", "--until-signal"]
    if env:
        argv = ["env", *(f"{key}={value}" for key, value in env.items()), *argv]
    proc = target.start(argv, name="sysprobe-fetch", stdout_path=log_path, sudo=True)
    deadline = time.monotonic() + timeout
    while True:
        code = target.poll(proc)
        lines = _log_lines(target, log_path)
        first = [r for r in map(_round, lines) if r.get("round") == 1]
        if first and first[0].get("ok"):
            return proc
        if first:  # every endpoint failed: nothing would be collected
            target.stop(proc, STOP_SEQUENCE)
            raise UsmlabError(f"system-probe fetch failed: {_last_error(lines)}")
        if code is not None:
            raise UsmlabError(f"system-probe fetch failed: {_last_error(lines)}")
        if time.monotonic() > deadline:
            target.stop(proc, STOP_SEQUENCE)
            raise UsmlabError(f"system-probe fetch: no answer from {socket} within {timeout:.0f} s")
        time.sleep(0.1)


def _round(line: str) -> dict[str, Any]:
    """The fetcher's end-of-round line as a dict; {} for any other line."""
    if not line.startswith('{"round"'):
        return {}
    found = parse_json_lines(line)
    return found[0] if found else {}


def stop_periodic(target: Target, proc: BackgroundProcess) -> int | None:
    """Stop the fetcher after the round in progress; its exit status (0 when it stopped cleanly)."""
    return target.stop(proc, STOP_SEQUENCE)


def fetch_final(
    target: Target,
    kit_dir: str,
    remote_run_dir: str,
    run_id: str,
    socket: str = DEFAULT_SOCKET,
    timeout: float = 600.0,
) -> SysprobeFiles:
    """Fetch every endpoint once more (`<name>.final.json`), after the traffic has stopped.

    Returns every dump of the run (the periodic ones too); an endpoint that failed (a disabled
    protocol answers 404) is a warning, not an error: the others are still worth judging.
    """
    out_dir = target.join(remote_run_dir, SUBDIR)
    target.run(["mkdir", "-p", "--", out_dir])
    argv = _argv(kit_dir, target, out_dir, run_id, socket, ".final.json")
    result = target.run(argv, sudo=True, check=False, timeout=timeout)
    warnings = [
        line.split(":", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith(("error:", "warning:"))
    ]
    if result.exit_code != 0 and not warnings:
        warnings.append(f"{KIT_SCRIPT} exited with status {result.exit_code}")
    return SysprobeFiles(files=dump_paths(target, out_dir), warnings=warnings)


def dump_paths(target: Target, out_dir: str) -> list[str]:
    """Remote paths of the dumps in out_dir (the fetcher's log and partial files left out)."""
    names = [
        n
        for n in target.list_files(out_dir)
        if n.endswith(".json") and "/" not in n and n.split(".", 1)[0] in ENDPOINT_PATHS
    ]
    return [target.join(out_dir, n) for n in names]
