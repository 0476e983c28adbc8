"""report.json `tuples`: every capture's connection, checked against the workloads' own record.

With each request line it prints, the built-in tracer prints the connection the write or read
went to, read from the socket itself (tracer.log `usmlab-tuple`; docs/formats.md). A client
write must go to the connection of a request that process had open at that moment (the
client's local port and the server's port, from client.jsonl); a server read to the
connection of a request it served (server.jsonl's peer port). A capture whose connection no
such request explains names another connection: a `wrong-tuple` misattribution, per server
port and overall. Requests with no tuple line at all are counted (`not_seen`), never guessed.
A line whose ports are both 0 means the tracer could not follow the pointers to the socket
(a failed read gives zeros): `unreadable`, a fault of the instrument, never a wrong tuple.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Any

from usmlab.analysis.model import Tuple4
from usmlab.analysis.verdict import Request

_LINE = re.compile(r"usmlab-tuple (write|read) ts=(\d+) pid=(\d+) tid=(\d+) fd=(-?\d+) true=(\S+)")
SLACK = 0.05  # seconds around a request's start and end


def read_tuples(path: Path) -> list[tuple[str, float, int, Tuple4]]:
    """(direction, seconds, pid, tuple) of each tuple line."""
    found = []
    if not path.exists():
        return found
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = _LINE.match(line)
            if match is not None:
                direction, ts, pid, _, _, tup = match.groups()
                found.append((direction, int(ts) / 1e9, int(pid), Tuple4.parse(tup)))
    return found


def tuples_section(run_dir: Path, requests: list[Request]) -> dict[str, Any] | None:
    """report.json `tuples`, or None when the tracer printed none (not the built-in one)."""
    lines = read_tuples(run_dir / "tracer.log")
    if not lines:
        return None
    client_pids = {r.pid for r in requests if r.pid is not None}
    # A client's request: (pid, local port, server port) -> [(from, to, index)].
    windows: dict[tuple[int | None, int, int | None], list[tuple[float, float, int]]] = {}
    for i, r in sorted(enumerate(requests), key=lambda item: item[1].start):
        if r.local_port is not None:
            key = (r.pid, r.local_port, r.remote_port)
            windows.setdefault(key, []).append((r.start, r.end, i))
    starts = {key: [start for start, _, _ in spans] for key, spans in windows.items()}
    writes = wrong = unreadable = 0
    seen: set[int] = set()
    per_server: dict[int, dict[str, int]] = {}
    examples: list[dict[str, Any]] = []
    for direction, ts, pid, tup in lines:
        if direction != "write" or pid not in client_pids:
            continue
        writes += 1
        if tup.sport == 0 and tup.dport == 0:
            unreadable += 1
            continue
        row = per_server.setdefault(tup.dport, {"writes": 0, "wrong_tuple": 0})
        row["writes"] += 1
        key = (pid, tup.sport, tup.dport)
        match = _request_at(windows.get(key, []), starts.get(key, []), ts)
        if match is not None:
            seen.add(match)
            continue
        wrong += 1
        row["wrong_tuple"] += 1
        if len(examples) < 20:
            examples.append({"ts": ts, "pid": pid, "tuple": str(tup), "reason": "wrong-tuple"})
    # A process the tracer printed no tuple line for at all (the Go clients under usm-model,
    # whose model lines carry their tuples) has no request "without a tuple".
    printing = {pid for _, _, pid, _ in lines}
    # Only a request handed to TLS can have a write (a failed handshake has a port, no write).
    connected = sum(
        1 for r in requests if r.wrote and r.local_port is not None and r.pid in printing
    )
    return {
        "client_writes": writes,
        # Counts only: a default run should not pay for scipy's import (rates: analysis/rates.py).
        "wrong_tuple": {"count": wrong, "of": writes},
        "unreadable": unreadable,
        "requests_seen": len(seen),
        "not_seen": connected - len(seen),
        "per_server": {str(port): row for port, row in sorted(per_server.items())},
        "examples": examples,
    }


def _request_at(
    spans: list[tuple[float, float, int]], starts: list[float], ts: float
) -> int | None:
    """The request on one connection a write at `ts` belongs to: the one under way then, else
    the nearest within SLACK (clocks and logging differ by a little). Keep-alive requests
    follow each other within a millisecond: the nearest, never merely the first in the slack."""
    index = bisect.bisect_right(starts, ts) - 1
    near = [spans[j] for j in (index, index + 1, index - 1) if 0 <= j < len(spans)]
    for start, end, i in near:
        if start <= ts <= end:
            return i
    gaps = [(min(abs(ts - start), abs(ts - end)), i) for start, end, i in near]
    best = min(gaps, default=None)
    return best[1] if best is not None and best[0] <= SLACK else None
