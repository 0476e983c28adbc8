"""What the target-side scripts share: one JSON-lines writer and reader, one stop ladder, and the
one grammar for durations and request paths.

Standard library only, Python 3.8+: deployed beside the other kit scripts, which import it as
`labkit` on the target; the controller imports it as `usmlab.kit.labkit` so the CLI validates
input with the very rules the workloads apply. The controller's own JSON-lines reader is
usmlab/jsonlines.py (this is the target side's copy, kept apart because it must run on 3.8).
"""

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterable, Iterator, NoReturn, Tuple

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


def json_lines(lines: Iterable[str]) -> Iterator[Dict[str, Any]]:
    """The JSON objects among lines; anything else (a cut last line, a message) is passed over."""
    for line in lines:
        if not line.lstrip().startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            yield item


# ---------------------------------------------------------------------------------------------
# Stopping process groups


def read_stat(pid: "int | str") -> "Tuple[str, int, str] | None":
    """(state, process group, start time) of a process, or None once it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), fields[19]


def live_groups() -> "set[int]":
    """Process group ids that still have a member that is not a zombie."""
    groups = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(name)
            if stat is not None and stat[0] not in "ZXx":
                groups.add(stat[1])
    return groups


def stop_groups(pgids: Iterable[int], ladder: Iterable[Tuple[int, float]]) -> None:
    """The target side's one stop ladder: signal every group with each step in turn, waiting up
    to the step's grace until no group has a live member left."""
    for sig, grace in ladder:
        alive = live_groups().intersection(pgids)
        if not alive:
            return
        for pgid in alive:
            with contextlib.suppress(OSError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and live_groups().intersection(alive):
            time.sleep(0.05)


# Crash-like: SIGTERM (as Kubernetes sends), then SIGKILL.
CRASH_LADDER = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))

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


# The one token a path may contain: replaced by the port of the server the request goes to.
PORT_TOKEN = "{port}"
_BRACED = re.compile(r"\{[^{}]*\}")


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
