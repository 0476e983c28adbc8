#!/usr/bin/env python3
"""HTTPS client that replays the lab's Kubernetes-API traffic on a fixed schedule.

It is copied onto a target and run with a bare ``python3`` (3.8+, standard library only), so it
imports nothing from usmlab but its sibling ``labkit``. Flags ``-url``, ``-count`` and
``-interval`` match the original Go test client. Request k is due at ``t0 + k * interval``
whatever earlier requests took, so the traffic pattern is the same on every run; each request
becomes one JSON line in ``--log`` (format in docs/formats.md) with the socket details the
analysis needs to attribute it.

The bug reproduced with two servers on different ports, each answering a path that names it, so
one client can rotate over several servers (``-url a,b``: request k goes to url k % n) and a path
can name the server it is sent to (``--paths /server{port}/identify``).

What it shares with the server and the CLI (the JSON-lines writer, the duration and path
grammar) is in ``labkit.py``, deployed beside it. ``summarize`` is reused by the controller.
"""

import argparse
import contextlib
import http.client
import math
import os
import random
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

if __package__:  # imported on the controller as usmlab.kit.client
    from . import labkit
else:  # run on the target, where labkit.py is deployed beside this script
    import labkit

DEFAULT_URL = "https://127.0.0.1:8443"
DEFAULT_COUNT = 10
DEFAULT_INTERVAL = "1s"
DEFAULT_TIMEOUT = "10s"
USER_AGENT = "usmlab-client/1"
# After SIGINT/SIGTERM, in-flight requests get this long to finish before being abandoned.
STOP_GRACE_S = 2.0
# What a keep-alive connection the server already closed fails with on its next use.
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionError, ssl.SSLEOFError)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Record = Dict[str, Any]


class UsageError(Exception):
    """Bad command-line input: reported as one ``error: ...`` line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Input parsing


class Target:
    """Where requests go: host, port and an optional path prefix from the URL."""

    def __init__(self, host: str, port: int, base_path: str) -> None:
        self.host = host
        self.port = port
        self.base_path = base_path

    @property
    def remote(self) -> str:
        """``host:port`` as written in client.jsonl (IPv6 hosts in brackets)."""
        return labkit.format_address(self.host, self.port)


def parse_url(url: str) -> Target:
    """``https://host[:port][/prefix]`` -> Target; ValueError on anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.netloc:
        raise ValueError("invalid url {!r}: expected https://host[:port][/path]".format(url))
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("invalid url {!r}: no user, query or fragment allowed".format(url))
    try:
        port = parts.port
    except ValueError:
        raise ValueError("invalid url {!r}: bad port".format(url)) from None
    host = parts.hostname
    if not host or (port is not None and port == 0):
        raise ValueError("invalid url {!r}: expected https://host[:port][/path]".format(url))
    return Target(host, port if port is not None else 443, parts.path.rstrip("/"))


def parse_urls(text: str) -> Tuple[Target, ...]:
    """Comma-separated https URLs (request k goes to the k % n-th); ValueError on a bad one."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError("invalid url {!r}: expected https://host[:port][/path]".format(text))
    return tuple(parse_url(u) for u in urls)


class ClientConfig:
    """Validated settings of one client run."""

    def __init__(
        self,
        targets: Sequence[Target],
        count: int,
        interval: float,
        duration: Optional[float],
        concurrency: int,
        reuse: bool,
        paths: Sequence[str],
        cacert: Optional[str],
        log: Optional[str],
        timeout: float,
        check: bool,
        conn_log: Optional[str] = None,
    ) -> None:
        self.targets = tuple(targets)
        self.count = count
        self.interval = interval
        self.duration = duration
        self.concurrency = concurrency
        self.reuse = reuse
        self.paths = tuple(paths)
        self.cacert = cacert
        self.log = log
        self.timeout = timeout
        self.check = check
        self.conn_log = conn_log


def build_parser() -> argparse.ArgumentParser:
    parser = labkit.OneLineArgumentParser(
        description="HTTPS client for the USM lab (flags -url/-count/-interval as the Go one).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-url",
        "--url",
        default=DEFAULT_URL,
        help="https://host[:port][/prefix], or several comma-separated: request k goes to url k%%n",
    )
    parser.add_argument("-count", "--count", default=str(DEFAULT_COUNT), help="0 = until stopped")
    parser.add_argument(
        "-interval", "--interval", default=DEFAULT_INTERVAL, help="2s, 500ms, 0.1 (seconds)"
    )
    parser.add_argument("--concurrency", default="1", help="worker threads (default 1)")
    parser.add_argument(
        "--connection",
        choices=("new", "reuse"),
        default="new",
        help="new TLS connection per request, or one keep-alive connection per worker",
    )
    parser.add_argument("--duration", default=None, help="stop scheduling after this long")
    parser.add_argument(
        "--paths",
        default=None,
        help="comma-separated paths, used in rotation; {port} = port of the request's server",
    )
    parser.add_argument("--cacert", default=None, help="verify the server against this CA")
    parser.add_argument("--log", default=None, help="client.jsonl path (appended to)")
    parser.add_argument("--timeout", default=DEFAULT_TIMEOUT, help="per-request socket timeout")
    parser.add_argument(
        "--check", action="store_true", help="only wait for a TLS handshake with every url"
    )
    parser.add_argument(
        "--conn-log",
        default=None,
        help="connection opens and closes, with each one's OpenSSL SSL* address (JSON lines)",
    )
    parser.add_argument(
        "--same-layout",
        action="store_true",
        help="run with address randomization off, so identical clients allocate at the same "
        "addresses (as workers forked from one parent do)",
    )
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> ClientConfig:
    """Parse and validate the command line; UsageError on bad values."""
    parser = build_parser()
    args = parser.parse_args(_attach_dash_values(parser, sys.argv[1:] if argv is None else argv))
    try:
        targets = parse_urls(args.url)
        interval = labkit.parse_duration(args.interval)
        timeout = labkit.parse_duration(args.timeout)
        duration = labkit.parse_duration(args.duration) if args.duration is not None else None
        paths = labkit.parse_paths(args.paths) if args.paths is not None else labkit.DEFAULT_PATHS
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    count = _parse_int("count", args.count)
    concurrency = _parse_int("concurrency", args.concurrency)
    try:  # the same bounds as the CLI's (labkit)
        labkit.check_count(count)
        labkit.check_concurrency(concurrency)
        labkit.check_duration(timeout, "timeout")
        if duration is not None:
            labkit.check_duration(duration)
        if interval:
            labkit.check_duration(interval, "interval")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ClientConfig(
        targets=targets,
        count=count,
        interval=interval,
        duration=duration,
        concurrency=concurrency,
        reuse=args.connection == "reuse",
        paths=paths,
        cacert=args.cacert,
        log=args.log,
        timeout=timeout,
        check=args.check,
        conn_log=args.conn_log,
    )


def _attach_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> List[str]:
    """``-interval -1s`` -> ``-interval=-1s``: argparse would take ``-1s`` for an option and
    report a confusing "expected one argument" instead of our "must not be negative"."""
    takes_value = {
        name for name, action in parser._option_string_actions.items() if action.nargs is None
    }
    known = set(parser._option_string_actions)
    out: List[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if (
            token in takes_value
            and following is not None
            and following.startswith("-")
            and following not in known
        ):
            out.append("{}={}".format(token, following))
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError("{} must be a whole number, got {!r}".format(name, text)) from None


# ---------------------------------------------------------------------------------------------
# Statistics (also used by the runner on client.jsonl)


def percentile(values: Iterable[float], pct: float) -> Optional[float]:
    """Nearest-rank percentile (an observed value, never interpolated); None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _spread_ms(seconds: List[float]) -> Dict[str, Optional[float]]:
    def ms(value: Optional[float]) -> Optional[float]:
        return None if value is None else round(value * 1000.0, 3)

    return {
        "p50": ms(percentile(seconds, 50)),
        "p99": ms(percentile(seconds, 99)),
        "max": ms(max(seconds) if seconds else None),
    }


def is_ok(record: Record) -> bool:
    """A request succeeded when it got a 2xx/3xx answer without a transport error."""
    status = record.get("status")
    return record.get("error") is None and isinstance(status, int) and 200 <= status < 400


class Sample:
    """Values for exact percentiles while there are at most `cap`; then a uniform random
    sample of `cap` of them (reservoir sampling), so a day-long run keeps flat memory. The
    maximum stays exact."""

    def __init__(self, cap: int = 100_000) -> None:
        self.cap = cap
        self.values: List[float] = []
        self.seen = 0
        self.max: Optional[float] = None
        self._rng = random.Random(0)

    def add(self, value: float) -> None:
        self.seen += 1
        if self.max is None or value > self.max:
            self.max = value
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < self.cap:
                self.values[slot] = value

    def spread_ms(self) -> Dict[str, Optional[float]]:
        spread = _spread_ms(self.values)
        spread["max"] = None if self.max is None else round(self.max * 1000.0, 3)
        return spread


class RunningSummary:
    """The client's summary, kept up to date one record at a time in bounded memory: what
    ``summarize`` returns, without holding the records (a client may run for days)."""

    def __init__(self, remotes: Optional[Sequence[str]] = None, count_connections: bool = True):
        self.sent = self.ok = 0
        self.latency, self.jitter = Sample(), Sample()
        self.first_start: Optional[float] = None
        self.last_end: Optional[float] = None
        # Distinct connection ids; a client that counts its own connections passes that count
        # to result() instead (one id per request with new connections: unbounded).
        self.connections: Optional[set] = set() if count_connections else None
        self.per_remote: Dict[str, Dict[str, int]] = {}
        for remote in remotes or ():
            self.per_remote.setdefault(remote, {"sent": 0, "ok": 0, "failed": 0})

    def add(self, record: Record) -> None:
        good = is_ok(record)
        self.sent += 1
        self.ok += good
        start, end, due = (
            record.get("start_mono"),
            record.get("end_mono"),
            record.get("scheduled_mono"),
        )
        if start is not None:
            self.first_start = start if self.first_start is None else min(self.first_start, start)
            if due is not None:
                self.jitter.add(start - due)
        if end is not None:
            self.last_end = end if self.last_end is None else max(self.last_end, end)
            if good and start is not None:
                self.latency.add(end - start)
        if self.connections is not None and record.get("conn_id") is not None:
            self.connections.add(record["conn_id"])
        count = self.per_remote.setdefault(
            str(record.get("remote")), {"sent": 0, "ok": 0, "failed": 0}
        )
        count["sent"] += 1
        count["ok" if good else "failed"] += 1

    def result(self, connections: Optional[int] = None) -> Dict[str, Any]:
        duration = 0.0
        if self.first_start is not None and self.last_end is not None:
            duration = self.last_end - self.first_start
        if connections is None:
            connections = len(self.connections or ())
        stats: Dict[str, Any] = {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.sent - self.ok,
            "connections": connections,
            "duration_s": round(duration, 6),
            "requests_per_second": round(self.sent / duration, 3) if duration > 0 else None,
            "latency_ms": self.latency.spread_ms(),
            "jitter_ms": self.jitter.spread_ms(),
        }
        if len(self.per_remote) > 1:
            stats["per_remote"] = self.per_remote
        return stats


def summarize(records: Iterable[Record], remotes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Counts, throughput, latency (successful requests) and start jitter (all requests).

    Start jitter is ``start_mono - scheduled_mono``: how late each request left compared with
    its slot in the schedule. Keys: sent, ok, failed, connections, duration_s,
    requests_per_second, latency_ms and jitter_ms (each {p50, p99, max}, None when empty).
    With several servers, ``per_remote`` ({remote: {sent, ok, failed}}) shows whether each one
    got its share; it is there when ``remotes`` (the client's servers, in url order, listed even
    if nothing reached them) has more than one, or else when the records name more than one.
    """
    summary = RunningSummary(remotes)
    for record in records:
        summary.add(record)
    return summary.result()


def format_summary(stats: Dict[str, Any]) -> List[str]:
    """The human-readable summary lines printed at the end of a run."""

    def spread(values: Dict[str, Optional[float]]) -> str:
        return " ".join(
            "{}={}".format(key, "-" if values[key] is None else "{:.1f}".format(values[key]))
            for key in ("p50", "p99", "max")
        )

    rate = stats["requests_per_second"]
    lines = [
        "Summary: sent={} ok={} failed={} connections={} in {:.2f} s ({} req/s)".format(
            stats["sent"],
            stats["ok"],
            stats["failed"],
            stats["connections"],
            stats["duration_s"],
            "-" if rate is None else "{:.1f}".format(rate),
        ),
        "Latency ms: " + spread(stats["latency_ms"]),
        "Start jitter ms: " + spread(stats["jitter_ms"]),
    ]
    for remote, count in stats.get("per_remote", {}).items():
        lines.append(
            "Remote {}: sent={} ok={} failed={}".format(
                remote, count["sent"], count["ok"], count["failed"]
            )
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Running requests


def make_tls_context(cacert: Optional[str]) -> ssl.SSLContext:
    """Verify against ``cacert`` if given; otherwise accept any certificate (self-signed lab)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cacert:
        context.load_verify_locations(cafile=cacert)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Schedule:
    """Hands out (k, due) with due = t0 + k*interval until count, duration or stop."""

    def __init__(self, t0: float, interval: float, count: int, duration: Optional[float]) -> None:
        self.t0 = t0
        self.interval = interval
        self.count = count
        self.duration = duration
        self._next = 0
        self._stopped = False
        self._lock = threading.Lock()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True

    def take(self) -> Optional[Tuple[int, float]]:
        with self._lock:
            k = self._next
            if self._stopped or (self.count and k >= self.count):
                return None
            if self.duration is not None and (
                k * self.interval >= self.duration or time.monotonic() - self.t0 >= self.duration
            ):
                return None
            self._next += 1
            return k, self.t0 + k * self.interval


class Connection:
    """An open TLS connection and the identity the logs give it."""

    def __init__(self, http_conn: http.client.HTTPSConnection, conn_id: str, event: Record) -> None:
        self.http = http_conn
        self.conn_id = conn_id
        self.event = event  # its `open` event in --conn-log: who it is, for its `close`


# A worker's open keep-alive connections (reuse mode), one per server: index in config.targets.
KeptConnections = Dict[int, Connection]


class LabClient:
    """Runs the schedule with N workers, records every request, prints a summary."""

    def __init__(
        self,
        config: ClientConfig,
        tls_context: ssl.SSLContext,
        log: "labkit.JsonLinesLog",
        conn_log: Optional["labkit.JsonLinesLog"] = None,
    ):
        self.config = config
        self.tls_context = tls_context
        self.log = log
        self.conn_log = conn_log
        self.pid = os.getpid()
        self.schedule = Schedule(time.monotonic(), config.interval, config.count, config.duration)
        self.stop_event = threading.Event()
        self.stop_signal: Optional[str] = None
        self._no_grace = False
        # Counts, not records: memory stays flat however long the client runs.
        self.summary = RunningSummary([t.remote for t in config.targets], count_connections=False)
        self._in_flight: Dict[int, Record] = {}
        self._lock = threading.Lock()
        self._connections = 0
        self._print_lock = threading.Lock()

    # -- control -------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop scheduling; requests already sent may still finish, unless stopped twice.

        Safe in a signal handler: it takes no lock the main thread might hold.
        """
        if self.stop_signal is None:
            self.stop_signal = reason
        else:
            self._no_grace = True
        self.schedule.stop()
        self.stop_event.set()

    def run(self, grace_s: float = STOP_GRACE_S) -> None:
        """Run until the schedule ends, or stop() plus a grace for in-flight requests."""
        workers = [
            threading.Thread(target=self._work, name="worker-{}".format(i), daemon=True)
            for i in range(self.config.concurrency)
        ]
        for worker in workers:
            worker.start()
        give_up_at: Optional[float] = None
        while any(w.is_alive() for w in workers):
            if self.stop_event.is_set() and give_up_at is None:
                give_up_at = time.monotonic() + grace_s
            if give_up_at is not None and (self._no_grace or time.monotonic() >= give_up_at):
                self._abandon_in_flight()
                break
            for worker in workers:
                worker.join(0.05)
                if worker.is_alive():
                    break

    # -- workers -------------------------------------------------------------------------------

    def _work(self) -> None:
        kept: KeptConnections = {}
        try:
            while True:
                slot = self.schedule.take()
                if slot is None:
                    return
                seq, due = slot
                if not self._wait_until(due):
                    return
                self._request(seq, due, kept)
        finally:
            for connection in kept.values():
                self._close(connection)

    def _wait_until(self, due: float) -> bool:
        """Sleep until ``due`` on the monotonic clock; False if stopped meanwhile."""
        while True:
            remaining = due - time.monotonic()
            if remaining <= 0:
                return True
            if self.stop_event.wait(remaining):
                return False

    def _request(self, seq: int, due: float, kept: KeptConnections) -> None:
        """Send request ``seq`` to server ``seq % n``; in reuse mode keep its connection open."""
        server = seq % len(self.config.targets)
        target = self.config.targets[server]
        template = self.config.paths[seq % len(self.config.paths)]
        path = target.base_path + labkit.expand_path(template, target.port)
        record: Record = {
            "seq": seq,
            "pid": self.pid,
            "tid": threading.get_native_id(),
            "local_addr": None,
            "local_port": None,
            "remote": target.remote,
            "method": "GET",
            "path": path,
            "status": None,
            "error": None,
            "scheduled_mono": due,
            "start_mono": time.monotonic(),
            "end_mono": None,
            "start_wall": time.time(),
            "end_wall": None,
            "conn_id": None,
            "wrote_request": False,
        }
        with self._lock:
            self._in_flight[seq] = record
        connection = kept.pop(server, None)
        try:
            connection, status = self._exchange(target, record, connection)
            record["status"] = status
        except (OSError, http.client.HTTPException, ValueError) as exc:
            record["error"] = labkit.one_line(exc)
            connection = None  # _exchange closed it
        record["end_mono"] = time.monotonic()
        record["end_wall"] = time.time()
        self._finish(record)
        if connection is not None and self.config.reuse:
            kept[server] = connection

    def _exchange(
        self, target: Target, record: Record, connection: Optional[Connection]
    ) -> Tuple[Optional[Connection], int]:
        """GET the record's path from ``target`` and read the whole body.

        Returns (connection to keep, status). Closes the connection on any failure, so the
        caller only has to forget it.
        """
        reused = connection is not None
        if connection is None:
            connection = self._connect(target, record)
        self._use(connection, record)
        try:
            return self._send(connection, record)
        except STALE_CONNECTION_ERRORS:
            self._close(connection)
            if not reused:
                raise
        except BaseException:
            self._close(connection)
            raise
        # The server closed an idle keep-alive connection under us: one retry on a fresh one.
        connection = self._connect(target, record)
        try:
            return self._send(connection, record)
        except BaseException:
            self._close(connection)
            raise

    def _use(self, connection: Connection, record: Record) -> None:
        sock = connection.http.sock
        local = sock.getsockname() if sock is not None else (None, None)
        record["conn_id"] = connection.conn_id
        record["local_addr"], record["local_port"] = local[0], local[1]

    @property
    def connections_opened(self) -> int:
        return self._connections

    def _connect(self, target: Target, record: Record) -> Connection:
        """TCP connect (recording the local port first, so a failed handshake still has it)."""
        raw = socket.create_connection((target.host, target.port), timeout=self.config.timeout)
        with self._lock:
            self._connections += 1
            conn_id = "{}-{}".format(self.pid, self._connections)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = raw.getsockname()
        record["conn_id"] = conn_id
        record["local_addr"], record["local_port"] = local[0], local[1]
        try:
            tls = self.tls_context.wrap_socket(raw, server_hostname=target.host)
        except BaseException:
            raw.close()
            raise
        http_conn = http.client.HTTPSConnection(
            target.host, target.port, timeout=self.config.timeout, context=self.tls_context
        )
        http_conn.sock = tls
        event = {
            "pid": self.pid, "conn_id": conn_id, "ssl": ssl_pointer(tls), "fd": tls.fileno(),
            "local_port": local[1], "remote": target.remote,
        }  # fmt: skip
        self._conn_event("open", event)
        return Connection(http_conn, conn_id, event)

    def _close(self, connection: Connection) -> None:
        # Logged before the close: the fd number is free again once it returns.
        self._conn_event("close", connection.event)
        connection.http.close()

    def _conn_event(self, kind: str, event: Record) -> None:
        if self.conn_log is not None:
            self.conn_log.write({"event": kind, **event, "mono": time.monotonic()})

    def _send(self, connection: Connection, record: Record) -> Tuple[Optional[Connection], int]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if not self.config.reuse:
            headers["Connection"] = "close"
        # Handed to TLS from here on: a probe on SSL_write sees the call even when it fails.
        record["wrote_request"] = True
        connection.http.request("GET", record["path"], headers=headers)
        response = connection.http.getresponse()
        response.read()
        status = int(response.status)
        if not self.config.reuse or response.will_close:
            self._close(connection)
            return None, status
        return connection, status

    # -- output --------------------------------------------------------------------------------

    def _finish(self, record: Record) -> None:
        with self._lock:
            if self._in_flight.pop(record["seq"], None) is None:
                return  # abandoned at stop: already recorded as interrupted
            self.summary.add(record)
            self.log.write(record)
        self._print_request(record)

    def _abandon_in_flight(self) -> None:
        """Record requests still running when the stop grace ran out as interrupted."""
        with self._lock:
            abandoned = [dict(r) for r in self._in_flight.values()]
            self._in_flight.clear()
            for record in abandoned:
                record["error"] = "interrupted: client stopped before the response arrived"
                record["status"] = None
                record["end_mono"] = time.monotonic()
                record["end_wall"] = time.time()
                self.summary.add(record)
                self.log.write(record)
        for record in abandoned:
            self._print_request(record)

    def _print_request(self, record: Record) -> None:
        if record["error"] is None:
            elapsed_ms = (record["end_mono"] - record["start_mono"]) * 1000.0
            outcome = "{} ({:.1f} ms)".format(record["status"], elapsed_ms)
        else:
            outcome = "error: {}".format(record["error"])
        self.say(
            "[{}] {} {} -> {}".format(record["seq"], record["method"], record["path"], outcome)
        )

    def say(self, line: str) -> None:
        """Print one line to stdout without interleaving with other threads."""
        # stdout gone (closed pipe): keep the jsonl going
        with self._print_lock, contextlib.suppress(OSError, ValueError):
            print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Readiness check


def check_ready(targets: Sequence[Target], tls_context: ssl.SSLContext, timeout: float) -> int:
    """Retry bare TLS handshakes (no HTTP) until every target completed one, within ``timeout``.

    One deadline for all: the runner waits for the whole lab to be up, not for each server.
    """
    deadline = time.monotonic() + timeout
    pending = list(targets)
    last_error = {target: "no attempt made" for target in pending}
    while pending:
        for target in list(pending):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                handshake(target, tls_context, min(remaining, 2.0))
                pending.remove(target)
            except ssl.SSLCertVerificationError as exc:
                # Retrying cannot fix a certificate the CA does not vouch for.
                print(
                    "error: TLS handshake with {}: {}".format(target.remote, labkit.one_line(exc)),
                    file=sys.stderr,
                )
                return EXIT_FAILED
            except OSError as exc:
                last_error[target] = labkit.one_line(exc)
        if not pending or deadline - time.monotonic() <= 0:
            break
        time.sleep(max(0.0, min(0.1, deadline - time.monotonic())))
    if not pending:
        print("ready", flush=True)
        return EXIT_OK
    print(
        "error: no TLS handshake within {:g} s with {}".format(
            timeout,
            "; ".join("{}: {}".format(t.remote, last_error[t]) for t in pending),
        ),
        file=sys.stderr,
    )
    return EXIT_FAILED


def handshake(target: Target, tls_context: ssl.SSLContext, timeout: float) -> None:
    """One TCP connect and TLS handshake with ``target``, then close; OSError if it fails."""
    raw = socket.create_connection((target.host, target.port), timeout=timeout)
    with raw, tls_context.wrap_socket(raw, server_hostname=target.host):
        pass


# ---------------------------------------------------------------------------------------------
# Entry point


def ssl_pointer(tls: ssl.SSLSocket) -> Optional[str]:
    """The address of the OpenSSL `SSL` object behind a socket, as a uprobe on SSL_set_fd sees
    it: CPython's `_ssl._SSLSocket` holds it right after its object header and its socket
    weakref (Modules/_ssl.c, 3.8-3.13). None where that layout is not known (docs/usm-model.md).
    """
    obj = getattr(tls, "_sslobj", None)
    if obj is None or sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return None  # not CPython, or a debug build (a bigger object header)
    import ctypes

    word = ctypes.sizeof(ctypes.c_void_p)
    address = ctypes.c_void_p.from_address(id(obj) + 3 * word).value
    return "{:x}".format(address) if address else None


ADDR_NO_RANDOMIZE = 0x0040000  # personality(2)


def run_with_same_layout() -> None:
    """Re-execute this client (same PID) with address randomization off, once: identical
    clients then allocate their SSL objects at identical addresses, as workers forked from one
    parent do (gunicorn, celery, multiprocessing). docs/usm-model.md."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)
    if current < 0 or current & ADDR_NO_RANDOMIZE:
        return
    if libc.personality(current | ADDR_NO_RANDOMIZE) < 0:
        raise OSError(ctypes.get_errno(), "personality(ADDR_NO_RANDOMIZE) refused")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = parse_config(argv)
    except UsageError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    if argv is None and "--same-layout" in sys.argv[1:]:
        try:
            run_with_same_layout()
        except OSError as exc:
            print("error: --same-layout: {}".format(labkit.one_line(exc)), file=sys.stderr)
            return EXIT_USAGE
    try:
        tls_context = make_tls_context(config.cacert)
    except (OSError, ssl.SSLError) as exc:
        print(
            "error: cannot load CA file {}: {}".format(config.cacert, labkit.one_line(exc)),
            file=sys.stderr,
        )
        return EXIT_USAGE
    if config.check:
        return check_ready(config.targets, tls_context, config.timeout)
    try:
        log = labkit.JsonLinesLog(config.log)
    except OSError as exc:
        print(
            "error: cannot open log {}: {}".format(config.log, labkit.one_line(exc)),
            file=sys.stderr,
        )
        return EXIT_USAGE

    try:
        conn_log = labkit.JsonLinesLog(config.conn_log) if config.conn_log else None
    except OSError as exc:
        print("error: cannot open --conn-log: {}".format(labkit.one_line(exc)), file=sys.stderr)
        return EXIT_USAGE
    client = LabClient(config, tls_context, log, conn_log)

    def on_signal(signum: int, frame: Any) -> None:
        client.stop(signal.Signals(signum).name)

    # Installed before announcing the PID, so a signal sent on seeing it is always handled.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("Starting TLS client (PID: {})".format(os.getpid()), flush=True)
    try:
        client.run()
    finally:
        log.close()
        if conn_log is not None:
            conn_log.close()
    if client.stop_signal is not None:
        client.say("Stopped by {}".format(client.stop_signal))
    stats = client.summary.result(connections=client.connections_opened)
    for line in format_summary(stats):
        client.say(line)
    return EXIT_OK if stats["failed"] == 0 else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
