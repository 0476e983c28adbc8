"""What the target-side scripts share: the one JSON-lines writer, and the one grammar for
durations and request paths (the target side's stop ladder is in lease.py, which must stand
alone).

Standard library only, Python 3.8+: deployed beside the other kit scripts, which import it as
`labkit` on the target; the controller imports it as `usmlab.kit.labkit` so the CLI validates
input with the very rules the workloads apply. JSON lines are read by the controller only
(usmlab/jsonlines.py); the target side writes them.
"""

import argparse
import json
import os
import re
import signal
import sys
import threading
from typing import Any, Dict, NoReturn, Tuple

EXIT_USAGE = 2

# The 8 paths of the original hand-run client (docs/background.md).
DEFAULT_PATHS = (
    "/api/v1/persistentvolumes/pvc-63958627-daf8-4858-bf79-3818733c87b4",
    "/api/v1/persistentvolumes/pvc-33641375-8db3-4ff3-b172-2ba76ce132fe",
    "/api/v1/persistentvolumes/pvc-12345678-1234-1234-1234-123456789abc",
    "/api/v1/namespaces/orgstore-maze/configmaps",
    "/api/v1/namespaces/postgres-orgstore-proposals/configmaps",
    "/api/v1/namespaces/datadog-agent/configmaps",
    "/api/v1/namespaces/zookeeper-lockness/configmaps",
    "/api/v1/namespaces/kube-system/pods",
)

# ---------------------------------------------------------------------------------------------
# JSON lines


class JsonLinesLog:
    """Thread-safe, line-buffered JSON-lines file: a killed process keeps every line written."""

    def __init__(self, path: "str | None") -> None:
        self._lock = threading.Lock()
        self._file = None  # type: IO[str] | None
        if path:
            # Open for the whole run (closed by close()); line-buffered so each line is flushed.
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record, separators=(", ", ": ")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ---------------------------------------------------------------------------------------------
# Input grammar (the CLI applies the same rules before anything is deployed)

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_TERM = re.compile(r"(" + _NUMBER + r")(us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``2s``, ``500ms``, ``250us``, ``1m``, ``1m30s`` (Go style) or ``0.1``.

    Raises ValueError with a user-facing message for anything else, negatives included.
    """
    spec = text.strip()
    if spec.startswith("-"):
        raise ValueError("duration must not be negative: {!r}".format(text))
    if re.fullmatch(_NUMBER + r"(?:[eE][+-]?\d+)?", spec):  # also str(float), e.g. 1e-05
        return float(spec)
    total, pos = 0.0, 0
    while pos < len(spec):
        term = _DURATION_TERM.match(spec, pos)
        if term is None:
            break
        total += float(term.group(1)) * _UNIT_SECONDS[term.group(2)]
        pos = term.end()
    if not spec or pos != len(spec):
        raise ValueError(
            "invalid duration {!r} (use e.g. 2s, 500ms, 1m30s or plain seconds like 0.1)".format(
                text
            )
        )
    return total


# Bounds, the same for the CLI and the workloads: a worker is a thread (and a TLS connection at
# a time), and a run is supervised by a person or a CI job.
MAX_CONCURRENCY = 1000
MAX_DURATION_S = 7 * 24 * 3600.0
MAX_COUNT = 100_000_000


def check_concurrency(value: int) -> int:
    if not 1 <= value <= MAX_CONCURRENCY:
        raise ValueError("concurrency must be 1 to {}, got {}".format(MAX_CONCURRENCY, value))
    return value


def check_duration(seconds: float, what: str = "duration") -> float:
    """A positive duration of at most a week (also an interval, a delay)."""
    if not 0 < seconds <= MAX_DURATION_S:
        raise ValueError("{} must be above 0 and at most 7 days, got {:g} s".format(what, seconds))
    return seconds


def check_count(value: int) -> int:
    if not 0 <= value <= MAX_COUNT:
        raise ValueError("count must be 0 (until stopped) to {}, got {}".format(MAX_COUNT, value))
    return value


# The one token a path may contain: replaced by the port of the server the request goes to.
PORT_TOKEN = "{port}"
_BRACED = re.compile(r"\{[^{}]*\}")


def expand_path(template: str, port: int) -> str:
    """The path as sent: ``{port}`` replaced by the port of the server it goes to."""
    return template.replace(PORT_TOKEN, str(port))


def parse_paths(text: str) -> Tuple[str, ...]:
    """Comma-separated absolute paths, ``{port}`` allowed; ValueError on anything else."""
    return check_paths(tuple(p.strip() for p in text.split(",") if p.strip()))


def check_paths(paths: Tuple[str, ...]) -> Tuple[str, ...]:
    """The paths, if every one is absolute, has no spaces and no token but ``{port}``."""
    if not paths:
        raise ValueError("--paths needs at least one path")
    for path in paths:
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise ValueError(
                "invalid path {!r}: paths start with / and have no spaces".format(path)
            )
        rest = path.replace(PORT_TOKEN, "")
        if "{" in rest or "}" in rest:
            unknown = _BRACED.search(rest)
            raise ValueError(
                "invalid path {!r}: {} (the only token is {})".format(
                    path,
                    "unknown token " + unknown.group(0) if unknown else "unmatched brace",
                    PORT_TOKEN,
                )
            )
    return paths


# ---------------------------------------------------------------------------------------------
# Small shared helpers


class StopFlag:
    """Set by SIGINT/SIGTERM once installed: a loop checks it between steps and ends cleanly."""

    def __init__(self) -> None:
        self.set = False

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.set = True


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (it may be another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def one_line(exc: BaseException) -> str:
    """An exception as a single line, for logs that are parsed line by line."""
    text = " ".join(str(exc).split())
    return "{}: {}".format(type(exc).__name__, text) if text else type(exc).__name__


def format_address(host: str, port: int) -> str:
    """``host:port`` with IPv6 hosts in brackets."""
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit status 2, never a usage dump."""

    def error(self, message: str) -> NoReturn:
        print("error: {}".format(message), file=sys.stderr)
        sys.exit(EXIT_USAGE)
