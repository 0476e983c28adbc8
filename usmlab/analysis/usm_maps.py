"""report.json `usm_maps`: the real tracer's own tuple caches, read while it ran, judged per
request (docs/usm-maps.md).

`usm_maps.jsonl` holds periodic dumps of USM's maps (kit/usm_maps.py). The Go client logs, per
request, its `*tls.Conn` address, fd and ports. For each request and each map, the entry under
its key (`conn_tup_by_go_tls_conn`: the `*tls.Conn`; `tuple_by_pid_fd`: `(pid, fd)`) in the
first dump taken while that key was the request's (from the request's start until the next
connection of the same key opened) is the tuple USM holds for it: one whose ports are not the
request's connection is a `stale-tuple` misattribution, naming the map. A request whose entry
no dump caught is counted as not seen, never guessed.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from usmlab.analysis.rates import rate
from usmlab.jsonlines import iter_jsonl

MAPS = ("conn_tup_by_go_tls_conn", "tuple_by_pid_fd")
GRACE = 1.0  # seconds after a request's end a dump may still show its entry


def _key(map_name: str, request: dict[str, Any]) -> Any:
    if map_name == "conn_tup_by_go_tls_conn":
        return request.get("tls_conn")
    if request.get("fd") is None:
        return None
    return (request.get("pid"), request.get("fd"))


def _entry_key(map_name: str, key: dict[str, Any]) -> Any:
    if map_name == "conn_tup_by_go_tls_conn":
        return key.get("ptr")
    return (key.get("pid"), key.get("fd"))


def _server_port(request: dict[str, Any]) -> int:
    port = str(request.get("remote") or "").rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def usm_maps_section(path: Path, requests: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """report.json `usm_maps` from the dumps file, or None when the run has none."""
    if not path.exists():
        return None
    dumps: dict[str, list[tuple[float, dict[Any, dict[str, Any]]]]] = {m: [] for m in MAPS}
    seen: dict[str, set[Any]] = {m: set() for m in MAPS}
    count = 0
    for _, line in iter_jsonl(path):
        name = line.get("map")
        if name not in dumps:
            continue
        count += 1
        table = {_entry_key(name, e["key"]): e["value"] for e in line.get("entries") or []}
        seen[name].update(table)
        dumps[name].append((float(line["mono"]), table))
    for name in MAPS:
        dumps[name].sort(key=lambda d: d[0])
    times = {name: [t for t, _ in dumps[name]] for name in MAPS}
    go_requests = sorted(
        (r for r in requests if r.get("tls_conn") and r.get("local_port") is not None),
        key=lambda r: r["start_mono"],
    )
    section: dict[str, Any] = {
        "dumps": count,
        "entries_seen": {name: len(seen[name]) for name in MAPS},
        "requests": len(go_requests),
    }
    examples: list[dict[str, Any]] = []
    for name in MAPS:
        # When each key was next taken by another connection: its entry is no longer ours.
        next_taken: dict[int, float] = {}
        last: dict[Any, int] = {}
        for i, r in enumerate(go_requests):
            key = _key(name, r)
            if key in last and go_requests[last[key]].get("conn_id") != r.get("conn_id"):
                next_taken[last[key]] = float(r["start_mono"])
            last[key] = i
        judged = stale = 0
        for i, r in enumerate(go_requests):
            key = _key(name, r)
            if key is None:
                continue
            start = float(r["start_mono"])
            until = min(float(r.get("end_mono") or start) + GRACE, next_taken.get(i, float("inf")))
            value = None
            at = bisect.bisect_left(times[name], start)
            while at < len(times[name]) and times[name][at] <= until:
                value = dumps[name][at][1].get(key)
                if value is not None:
                    break
                at += 1
            if value is None:
                continue
            judged += 1
            if (value.get("sport"), value.get("dport")) != (r["local_port"], _server_port(r)):
                stale += 1
                if len(examples) < 20:
                    examples.append({
                        "seq": r.get("seq"), "pid": r.get("pid"), "conn_id": r.get("conn_id"),
                        "map": name, "reason": "stale-tuple",
                        "tuple": f"{value.get('saddr')}:{value.get('sport')}->"
                                 f"{value.get('daddr')}:{value.get('dport')}",
                        "connection": f"{r.get('local_addr')}:{r['local_port']}->"
                                      f"{r.get('remote')}",
                    })  # fmt: skip
        section[name] = {
            "judged": judged,
            "not_seen": len(go_requests) - judged,
            "stale_tuple": rate(stale, judged),
        }
    section["examples"] = examples
    return section
