"""report.json `model`: what the usm-model tracer saw, judged, next to what the client logs
predict (docs/usm-model.md).

Observed: every Go TLS write the model printed (tracer.log `usmlab-model write`), with the true
tuple read from the socket and the tuple the modelled caches gave; a write whose model tuple is
not its true tuple is a stale tuple, named by the cache that answered. Predicted: the same
caches replayed from the client's own logs alone (its requests' `*tls.Conn` and `*netFD`
addresses and fd numbers, its connections' opens and tls.Conn closes; socket closes, which the
Go runtime's finalizers make without telling the client, from the model's own close events).
The two counts must agree; a difference is reported, never hidden.
"""

from __future__ import annotations

import bisect
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usmlab.analysis.rates import rate
from usmlab.jsonlines import read_jsonl
from usmlab.manifest import Manifest

# A client's logged close and the model's probe on it are this close at most (same clock).
CLOSE_MATCH_S = 0.05
_LINE = re.compile(r"usmlab-model (write|close|tcp_close|set_fd) (.*)")
_FIELD = re.compile(r"(\w+)=(\S*)")
# Which cache answered a write; with "none" and "unresolved" (OpenSSL model) USM records nothing.
VIA = {0: "conn", 1: "fd", 2: "socket", 3: "none", 4: "unresolved"}
NO_TUPLE = ("none", "unresolved")


def conn_log_name(client: str) -> str:
    """The connection log of a Go client process (`--conn-log`)."""
    return f"conns-{client}.jsonl"


@dataclass(frozen=True)
class Tuple4:
    saddr: str
    sport: int
    daddr: str
    dport: int

    @classmethod
    def parse(cls, text: str) -> Tuple4:
        """`100007f:58630-100007f:18443` (addresses as the kernel's __be32, printed as u32)."""
        src, dst = text.split("-")
        (sa, sp), (da, dp) = src.split(":"), dst.split(":")
        return cls(_ip(sa), int(sp), _ip(da), int(dp))

    def __str__(self) -> str:
        return f"{self.saddr}:{self.sport}->{self.daddr}:{self.dport}"


def _ip(hexed: str) -> str:
    return socket.inet_ntoa(struct.pack("<I", int(hexed, 16)))


@dataclass
class Write:
    ts: float
    pid: int
    tid: int
    conn: str
    netfd: str
    fd: int
    true: Tuple4
    model: Tuple4
    owner: int
    via: str

    @property
    def stale(self) -> bool:
        return self.via not in NO_TUPLE and self.model != self.true


@dataclass
class ModelTrace:
    writes: list[Write] = field(default_factory=list)
    closes: int = 0
    close_hits: int = 0
    socket_closes: list[tuple[float, int, int, Tuple4, bool]] = field(default_factory=list)
    # (pid, tls.Conn address as an int) -> the probe times of its closes
    close_times: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    # OpenSSL model: every SSL_set_fd, (ts, pid, SSL* as an int, fd, entry was there, its pid)
    set_fds: list[tuple[float, int, int, int, bool, int]] = field(default_factory=list)


REPEAT_WINDOW = 0.05  # seconds


def drop_repeats(writes: list[Write]) -> tuple[list[Write], int]:
    """Writes without the repeated entries of one call: a uprobe at a Go function's entry fires
    again when the goroutine's stack grows in the function's prologue (the runtime restarts the
    function after growing it), so one Write may print twice, from the same thread on the same
    tls.Conn, the second answered by the cache the first filled."""
    kept: list[Write] = []
    last: dict[tuple[int, str], Write] = {}
    repeats = 0
    for w in sorted(writes, key=lambda w: w.ts):
        before = last.get((w.tid, w.conn))
        if (
            before is not None and w.ts - before.ts < REPEAT_WINDOW and w.via == "conn"
            and w.model == before.model and w.true == before.true
        ):  # fmt: skip
            repeats += 1
            continue
        last[(w.tid, w.conn)] = w
        kept.append(w)
    return kept, repeats


def read_model_trace(path: Path) -> ModelTrace:
    trace = ModelTrace()
    if not path.exists():
        return trace
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = _LINE.match(line)
            if match is None:
                continue
            f = dict(_FIELD.findall(match[2]))
            ts = int(f["ts"]) / 1e9
            if match[1] == "write":
                trace.writes.append(
                    Write(ts, int(f["pid"]), int(f["tid"]), f["conn"], f["netfd"], int(f["fd"]),
                          Tuple4.parse(f["true"]), Tuple4.parse(f["model"]), int(f["owner"]),
                          VIA[int(f["via"])])
                )  # fmt: skip
            elif match[1] == "set_fd":
                trace.set_fds.append(
                    (ts, int(f["pid"]), int(f["conn"], 16), int(f["fd"]), f["had"] == "1",
                     int(f["prev"]))
                )  # fmt: skip
            elif match[1] == "close":
                trace.closes += 1
                trace.close_hits += f.get("hit") == "1"
                key = (int(f["pid"]), int(f["conn"], 16))
                trace.close_times.setdefault(key, []).append(ts)
            else:
                trace.socket_closes.append(
                    (ts, int(f["pid"]), int(f["fd"]), Tuple4.parse(f["true"]), f["found"] == "1")
                )
    return trace


# -- the prediction from the client logs ---------------------------------------------------------


def _key(kind: str, pid: int, conn: object, netfd: str) -> tuple[Any, ...]:
    """A cache key of `kind`: the conn (*tls.Conn, or OpenSSL's SSL*), with the netFD or the pid."""
    if kind == "pointer":
        return (conn,)
    if kind == "pointer-fd":
        return (conn, netfd)
    return (pid, conn)


def predict(
    key_kind: str,
    fd_cache: bool,
    requests: list[dict[str, Any]],
    conn_events: list[dict[str, Any]],
    socket_closes: Iterable[tuple[float, int, int, Tuple4, bool]],
    probe_times: ProbeTimes | None = None,
) -> dict[str, int]:
    """Replay the modelled caches over the client's own record of its connections.

    Each connection's first request is its first write (a miss fills the entry, a live entry
    of another connection under the same key is a stale answer); a tls.Conn close deletes its
    key; a socket close (in its own process) deletes its (pid, fd) entry.

    What is replayed (addresses, fds, ports, which close ends which connection) comes from the
    client's logs alone. When the events happened comes from the probes where they saw them:
    the logs time the calls, not the instants the caches change, and two processes' events
    a fraction of a millisecond apart would otherwise replay in either order.
    """
    times = probe_times or ProbeTimes()
    # Without a probe time, a connection's first write follows its handshake: its `open`
    # event, logged after the handshake (the request started before the dial).
    opened = {
        (e.get("pid"), e.get("conn_id")): float(e["mono"])
        for e in conn_events
        if e.get("event") == "open"
    }
    events: list[tuple[float, int, Any]] = []
    for request in requests:
        if request.get("tls_conn") and request.get("local_port") is not None:
            at = times.write(request) or max(
                float(request["start_mono"]),
                opened.get((request.get("pid"), request.get("conn_id")), 0.0),
            )
            events.append((at, 1, request))
    for event in conn_events:
        if event.get("event") == "close":
            events.append((times.close(event), 0, event))
    for ts, pid, fd, tup, found in socket_closes:
        if found:
            socket = {"event": "socket", "pid": pid, "fd": fd, "ports": (tup.sport, tup.dport)}
            events.append((ts, 0, socket))
    events.sort(key=lambda e: (e[0], e[1]))
    # An entry is the connection it was filled from: (pid, local port, server port); one local
    # port serves connections to two servers at once.
    conn_cache: dict[tuple[Any, ...], tuple[int, int, int]] = {}
    fd_entries: dict[tuple[int, int], tuple[int, int, int]] = {}
    netfd_of: dict[tuple[int, str], str] = {}
    stale = {"conn": 0, "fd": 0}
    reused = 0
    seen: set[tuple[int, int, int]] = set()
    for _, _, item in events:
        if item.get("event") == "close":
            pid, conn = item["pid"], item["tls_conn"]
            conn_cache.pop(_key(key_kind, pid, conn, netfd_of.get((pid, conn), "")), None)
            continue
        if item.get("event") == "socket":
            entry = fd_entries.get((item["pid"], item["fd"]))
            if entry is not None and entry[1:] == item["ports"]:
                del fd_entries[(item["pid"], item["fd"])]
            continue
        pid, port = int(item["pid"]), int(item["local_port"])
        me = (pid, port, _server_port(item))
        conn, netfd = str(item["tls_conn"]), str(item.get("net_fd") or "")
        netfd_of[(pid, conn)] = netfd
        key = _key(key_kind, pid, conn, netfd)
        # One connection: a local port is reused for connections to different servers.
        first = (pid, port, _server_port(item)) not in seen
        seen.add((pid, port, _server_port(item)))
        cached = conn_cache.get(key)
        if cached is not None:
            if first:
                reused += 1
            if cached != me:
                stale["conn"] += 1
            continue
        answer = me
        if fd_cache and item.get("fd") is not None:
            slot = (pid, int(item["fd"]))
            if slot in fd_entries:
                answer = fd_entries[slot]
                if answer != me:
                    stale["fd"] += 1
            else:
                fd_entries[slot] = answer
        conn_cache[key] = answer
    # The Go model gives every write a tuple: none goes without one.
    return {"stale": stale["conn"] + stale["fd"], **{f"stale_{k}": v for k, v in stale.items()},
            "reused_addresses": reused, "missed": 0}  # fmt: skip


def predict_openssl(
    key_kind: str,
    requests: list[dict[str, Any]],
    conn_events: list[dict[str, Any]],
    probe_times: ProbeTimes,
    set_fds: Iterable[tuple[float, int, int, int, bool, int]],
) -> dict[str, int]:
    """Replay USM's OpenSSL cache (`ssl_sock_by_ctx`) over the Python clients' own record of
    their connections: each `open` (its SSL* address, fd, ports) is an SSL_set_fd that
    (re)initializes the entry under its key; a request's write resolves an unresolved entry
    from the socket at the entry's fd in the writing process (whatever connection is open there
    now) and takes the cached tuple otherwise. Ordered by the probes' times, as `predict`."""
    set_fd_at: dict[tuple[int, int, int], list[float]] = {}
    for ts, pid, ssl, fd, _, _ in sorted(set_fds):
        set_fd_at.setdefault((pid, ssl, fd), []).append(ts)
    ssl_of: dict[tuple[Any, Any], int] = {}
    events: list[tuple[float, int, dict[str, Any]]] = []
    for event in conn_events:
        try:
            ssl, fd, mono = int(str(event["ssl"]), 16), int(event["fd"]), float(event["mono"])
        except (KeyError, TypeError, ValueError):
            continue  # no SSL* known (not CPython): nothing to replay for it
        if event.get("event") == "open":
            ssl_of[(event.get("pid"), event.get("conn_id"))] = ssl
            times = set_fd_at.get((int(event["pid"]), ssl, fd), [])
            index = bisect.bisect_right(times, mono) - 1
            events.append((times[index] if index >= 0 else mono, 0, event))
        elif event.get("event") == "close":
            events.append((mono, 0, event))
    for request in requests:
        if request.get("local_port") is not None and request.get("conn_id"):
            at = probe_times.write(request) or float(request["start_mono"])
            events.append((at, 1, request))
    events.sort(key=lambda e: (e[0], e[1]))
    entries: dict[Any, list[Any]] = {}  # key -> [fd, resolved connection or None]
    open_at: dict[tuple[int, int], tuple[int, int, int]] = {}  # (pid, fd) -> its connection
    stale = cross = reused = missed = 0
    for _, is_write, item in events:
        pid = int(item["pid"])
        me = (pid, int(item["local_port"]), _server_port(item))
        ssl = ssl_of.get((item.get("pid"), item.get("conn_id")))
        key = None if ssl is None else _key(key_kind, pid, ssl, "")
        if not is_write:
            fd = int(item["fd"])
            if item["event"] == "close":
                if open_at.get((pid, fd)) == me:
                    del open_at[(pid, fd)]
                continue
            reused += key in entries
            entries[key] = [fd, None]
            open_at[(pid, fd)] = me
            continue
        entry = None if key is None else entries.get(key)
        if entry is None:
            missed += 1
            continue
        if entry[1] is None:
            entry[1] = open_at.get((pid, entry[0]))
            if entry[1] is None:
                missed += 1  # the entry's fd names no socket here: USM records nothing
                continue
        if entry[1] != me:
            stale += 1
            cross += entry[1][0] != pid
    return {"stale": stale, "stale_conn": stale, "stale_fd": 0, "cross_process": cross,
            "reused_addresses": reused, "missed": missed}  # fmt: skip


@dataclass
class ProbeTimes:
    """When the model's probes saw each request's write and each tls.Conn close."""

    # (pid, local port, server port) -> the probe times of the writes on it, in order
    writes: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)
    closes: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, writes: list[Write], trace: ModelTrace) -> ProbeTimes:
        by_conn: dict[tuple[int, int, int], list[float]] = {}
        for w in sorted(writes, key=lambda w: w.ts):
            by_conn.setdefault((w.pid, w.true.sport, w.true.dport), []).append(w.ts)
        return cls(by_conn, trace.close_times)

    def write(self, request: dict[str, Any]) -> float | None:
        """The probe time of the request's write: the first on its connection after it began
        (a local port serves many connections over a long run)."""
        key = (request.get("pid"), request.get("local_port"), _server_port(request))
        times = self.writes.get(key)  # type: ignore[arg-type]
        if not times:
            return None
        index = bisect.bisect_left(times, float(request["start_mono"]))
        return times[index] if index < len(times) else None

    def close(self, event: dict[str, Any]) -> float:
        """The probe time of a logged close: the nearest close of that tls.Conn in that pid."""
        logged = float(event["mono"])
        try:
            key = (int(event["pid"]), int(str(event["tls_conn"]), 16))
        except (KeyError, ValueError):
            return logged
        near = [t for t in self.closes.get(key, ()) if abs(t - logged) < CLOSE_MATCH_S]
        return min(near, key=lambda t: abs(t - logged)) if near else logged


def _server_port(request: dict[str, Any]) -> int:
    port = str(request.get("remote") or "").rpartition(":")[2]
    return int(port) if port.isdigit() else 0


# -- judging ------------------------------------------------------------------------------------


def model_section(run_dir: Path, manifest: Manifest) -> dict[str, Any] | None:
    """report.json `model` for a run of the usm-model tracer; None for other runs."""
    settings = manifest.get("model")
    if not isinstance(settings, dict):
        return None
    key_kind, fd_cache = str(settings.get("key")), bool(settings.get("fd_cache"))
    trace = read_model_trace(run_dir / "tracer.log")
    requests = [r for log in manifest.client_logs for r in read_jsonl(log)]
    conn_events = [
        e
        for p in manifest.names("client")
        for e in read_jsonl(run_dir / conn_log_name(p), missing_ok=True)
    ]
    openssl = settings.get("library") == "openssl"
    if not openssl:  # the Go clients' requests (they log their tls.Conn); a Python neighbour's
        requests = [r for r in requests if "tls_conn" in r]  # are not the model's to judge
    # Go: one Write may print twice (drop_repeats); an OpenSSL write is one call, one line.
    every_write, repeats = (trace.writes, 0) if openssl else drop_repeats(trace.writes)
    # The clients' writes: the prediction knows only what the clients logged. A Go server's
    # responses go through the same probes; they are counted apart.
    client_pids = {r.get("pid") for r in requests}
    writes = [w for w in every_write if w.pid in client_pids]
    times = ProbeTimes.of(writes, trace)
    # A request may write more than once (headers, then body); the caches answer its first
    # write, and the prediction replays requests: each is judged by its first write.
    firsts = {
        (r.get("pid"), r.get("local_port"), _server_port(r), times.write(r)) for r in requests
    }
    request_writes = [w for w in writes if (w.pid, w.true.sport, w.true.dport, w.ts) in firsts]
    stale = [w for w in request_writes if w.stale]
    connections = {(w.pid, w.true) for w in writes}
    if openssl:
        # An SSL_set_fd on an address whose entry was alive: another connection's, maybe
        # another process's (the entry is taken over).
        reused = sum(1 for s in trace.set_fds if s[1] in client_pids and s[4])
        predicted = predict_openssl(key_kind, requests, conn_events, times, trace.set_fds)
    else:
        first_writes: dict[tuple[int, Tuple4], Write] = {}
        for w in writes:
            first_writes.setdefault((w.pid, w.true), w)
        reused = sum(1 for w in first_writes.values() if w.via == "conn")
        predicted = predict(key_kind, fd_cache, requests, conn_events, trace.socket_closes, times)
    missed = sum(1 for w in request_writes if w.via in NO_TUPLE)
    judged = judge_requests(requests, request_writes)
    judged_writes = len(request_writes)
    section: dict[str, Any] = {
        "key": key_kind,
        "library": "openssl" if openssl else "go",
        "fd_cache": fd_cache,
        "writes": len(writes),
        "request_writes": judged_writes,
        "other_writes": len(every_write) - len(writes),
        "repeated_entries": repeats,
        "closes": trace.closes,
        "close_hits": trace.close_hits,
        "socket_closes": len(trace.socket_closes),
        "connections": len(connections),
        "reused_addresses": rate(reused, len(connections)),
        "stale_observed": rate(len(stale), judged_writes),
        "stale_by_cache": {
            via: sum(1 for w in stale if w.via == via) for via in ("conn", "fd", "socket")
        },
        "stale_predicted": rate(predicted["stale"], judged_writes),
        "predicted": predicted,
        "cross_process_collisions": rate(sum(1 for w in stale if w.owner != w.pid), judged_writes),
        "no_tuple": rate(missed, judged_writes),
        "requests": judged,
    }
    section["agree"] = (
        predicted["stale"] == len(stale)
        and predicted["reused_addresses"] == reused
        and predicted["missed"] == missed
    )
    if not section["agree"]:
        section["finding"] = (
            f"the model printed {len(stale)} stale tuple(s), {reused} reused address(es) and "
            f"{missed} write(s) without a tuple; the client logs predict {predicted['stale']}, "
            f"{predicted['reused_addresses']} and {predicted['missed']}"
        )
    return section


def judge_requests(requests: list[dict[str, Any]], writes: list[Write]) -> dict[str, Any]:
    """Each request against the model's answer for its first write: `stale-tuple` when the
    model gave another connection's tuple, and `wrong-server` when that tuple names another
    server port than the one the request went to."""
    by_conn: dict[tuple[int, int, int], list[Write]] = {}
    for w in sorted(writes, key=lambda w: w.ts):
        by_conn.setdefault((w.pid, w.true.sport, w.true.dport), []).append(w)
    judged = stale = wrong_server = 0
    examples: list[dict[str, Any]] = []
    for request in sorted(requests, key=lambda r: r.get("start_mono") or 0):
        port = request.get("local_port")
        server_port = _server_port(request)
        queue = by_conn.get((request.get("pid"), port, server_port)) if port is not None else None
        if not queue:
            continue
        write = queue.pop(0)
        judged += 1
        if not write.stale:
            continue
        stale += 1
        other = write.model.dport != server_port
        wrong_server += other
        if len(examples) < 20:
            examples.append({
                "seq": request.get("seq"), "path": request.get("path"), "pid": request.get("pid"),
                "true": str(write.true), "model": str(write.model), "cache": write.via,
                "owner_pid": write.owner, "reason": "stale-tuple",
                **({"recorded_against_port": write.model.dport} if other else {}),
            })  # fmt: skip
    return {
        "sent": len(requests),
        "judged": judged,
        "not_seen": len(requests) - judged,
        "stale_tuple": rate(stale, judged),
        "wrong_server": rate(wrong_server, judged),
        "examples": examples,
    }
