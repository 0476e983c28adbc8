"""A TEST DOUBLE of system-probe's debug endpoints, for usmlab's tests only. It is not system-probe.

It serves, over a unix socket in a temporary folder, JSON in the shapes the real system-probe
produces (docs/sysprobe.md cites the upstream sources of each shape):

- `/network_tracer/debug/http_monitoring` and `/debug/http2_monitoring`: a list of
  RequestSummary objects (Go field names: Client, Server, DNS, Path, Method, ByStatus,
  StaticTags, DynamicTags); http2 answers 404 `{"error": "http2 monitoring is disabled"}`
  when `http2_enabled` is False, as system-probe does.
- `/network_tracer/connections`: a jsonpb (EmitDefaults) `Connections` object whose `conns`
  come first and whose `tags` string table comes after them.

Like Go's net/http, a body that fits in 2048 bytes gets a Content-Length and a longer one is
sent chunked (`chunk_size` forces chunking with chunks of that size). Like system-probe, stats
are handed out per `client_id` as deltas: a read returns what was added since that client's
previous read, and a client's first read starts from the entries no one has read yet.
Connections are returned whole every time (they stand for active connections).

`large_http_entries = N` makes http_monitoring answer N generated entries, produced while
writing, so tests can prove the fetcher and parser stream.

Run `python tests/sysprobe_double.py --write-sample FILE` to regenerate
tests/data/sysprobe_double_http_monitoring.json (fetched from this double by the real kit script).
"""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parents[1]
KIT_FETCH = REPO / "usmlab" / "kit" / "sysprobe_fetch.py"
GO_BUFFER_BEFORE_CHUNKING = 2048
STATIC_TAG_GO = 1 << 2  # tls.library:go (tags-types.h)
DEFAULT_CLIENT_ID = "-1"  # what system-probe uses when no client_id is given


def request_summary(
    client: tuple[str, int],
    server: tuple[str, int],
    path: str,
    by_status: dict[int, int],
    method: str = "GET",
    static_tags: int = 0,
    dynamic_tags: list[str] | None = None,
    dns: str = "",
) -> dict[str, Any]:
    """One http_monitoring entry, as pkg/network/protocols/http/debugging encodes it."""
    return {
        "Client": {"IP": client[0], "Port": client[1]},
        "Server": {"IP": server[0], "Port": server[1]},
        "DNS": dns,
        "Path": path,
        "Method": method,
        "ByStatus": {
            str(code): {"Count": count, "FirstLatencySample": 0.0012, "LatencyP50": 0.0011}
            for code, count in sorted(by_status.items())
        },
        "StaticTags": static_tags,
        "DynamicTags": dynamic_tags,
    }


def connection(
    pid: int,
    laddr: tuple[str, int],
    raddr: tuple[str, int],
    direction: str = "local",
    tags: list[int] | None = None,
) -> dict[str, Any]:
    """One `conns` element as jsonpb with EmitDefaults prints agent-payload's Connection.

    64-bit counters are strings (proto3 JSON); the serialized aggregations (httpAggregations,
    protobuf bytes in base64) are left null: usmlab does not read them.
    """
    return {
        "pid": pid,
        "laddr": {"ip": laddr[0], "port": laddr[1], "containerId": "", "hostName": ""},
        "raddr": {"ip": raddr[0], "port": raddr[1], "containerId": "", "hostName": ""},
        "family": "v6" if ":" in laddr[0] else "v4",
        "type": "tcp",
        "isLocalPortEphemeral": "ephemeralFalse" if laddr[1] < 32768 else "ephemeralTrue",
        "lastBytesSent": "1480",
        "lastBytesReceived": "920",
        "lastRetransmits": 0,
        "direction": direction,
        "lastPacketsSent": "9",
        "lastPacketsReceived": "8",
        "protocol": {"stack": ["protocolTLS", "protocolHTTP"]},
        "netNS": 4026531840,
        "remoteNetworkId": "",
        "ipTranslation": None,
        "rtt": 41,
        "rttVar": 20,
        "intraHost": True,
        "dnsSuccessfulResponses": 0,
        "dnsFailedResponses": 0,
        "dnsTimeouts": 0,
        "dnsSuccessLatencySum": "0",
        "dnsFailureLatencySum": "0",
        "dnsCountByRcode": {},
        "lastTcpEstablished": 1,
        "lastTcpClosed": 0,
        "dnsStatsByDomain": {},
        "dnsStatsByDomainByQueryType": {},
        "dnsStatsByDomainOffsetByQueryType": {},
        "routeIdx": -1,
        "routeTargetIdx": 0,
        "httpAggregations": None,
        "tags": tags or [],
        "tagsIdx": 0,
        "tagsChecksum": 0,
        "stateIndex": 0,
        "dataStreamsAggregations": None,
        "http2Aggregations": None,
        "databaseAggregations": None,
        "tcpFailuresByErrCode": {},
    }


def generated_entry(i: int) -> dict[str, Any]:
    """Entry i of the large response: varied ports and paths, all on the two lab servers."""
    port = 8443 if i % 2 else 9443
    return request_summary(
        ("127.0.0.1", 32768 + i % 28000),
        ("127.0.0.1", port),
        f"/server{port}/identify/{i}",
        {200: 1 + i % 3},
        static_tags=STATIC_TAG_GO,
    )


def generated_entries_json(count: int) -> Iterator[bytes]:
    """Compact JSON of generated_entry(0..count-1), filled into a template (json.dumps is slow).

    The first entries are compared with generated_entry itself, so the template cannot drift.
    """
    sample = request_summary(
        ("127.0.0.1", 11111), ("127.0.0.1", 22222), "/server22222/identify/33333", {200: 44444},
        static_tags=STATIC_TAG_GO,
    )  # fmt: skip
    pattern = json.dumps(sample, separators=(",", ":")).replace("{", "{{").replace("}", "}}")
    for number, marker in enumerate(("11111", "22222", "33333", "44444")):
        pattern = pattern.replace(marker, f"{{{number}}}")
    for i in range(count):
        port = 8443 if i % 2 else 9443
        text = pattern.format(32768 + i % 28000, port, i, 1 + i % 3)
        if i < 4 and json.loads(text) != generated_entry(i):
            raise AssertionError("the large-response template no longer matches generated_entry")
        yield text.encode()


class SysprobeDouble:
    """The double: start(), feed it with add_http()/set_connections(), stop()."""

    def __init__(self, folder: Path) -> None:
        self.socket_path = folder / "sysprobe.sock"
        self.http2_enabled = True
        self.chunk_size: int | None = None  # force chunked encoding with chunks of this size
        self.large_http_entries = 0
        self.delay = 0.0  # seconds to wait before answering
        self.failure: int | None = None  # answer every request with this status (a sick probe)
        self.requests: list[str] = []  # request targets, in arrival order
        self.encodings: list[str] = []  # "content-length" or "chunked", per answer
        self.request_seen = threading.Event()
        self._feeds: dict[str, list[dict[str, Any]]] = {"http": [], "http2": []}
        self._drained: dict[str, int] = {"http": 0, "http2": 0}
        self._clients: dict[str, dict[str, int]] = {}
        self._conns: list[dict[str, Any]] = []
        self._tags: list[str] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    # -- feeding ----------------------------------------------------------------------------

    def add_http(self, *entries: dict[str, Any], protocol: str = "http") -> None:
        with self._lock:
            self._feeds[protocol].extend(entries)

    def set_connections(self, conns: list[dict[str, Any]], tags: list[str]) -> None:
        with self._lock:
            self._conns = list(conns)
            self._tags = list(tags)

    # -- serving ----------------------------------------------------------------------------

    def _delta(self, client_id: str, protocol: str) -> list[dict[str, Any]]:
        """What this client has not seen; every read resets the client for all protocols."""
        with self._lock:
            offsets = self._clients.setdefault(client_id, dict(self._drained))
            delta = self._feeds[protocol][offsets[protocol] :]
            for name, feed in self._feeds.items():
                offsets[name] = len(feed)
                self._drained[name] = len(feed)
            return delta

    def _connections_doc(self) -> Iterator[bytes]:
        with self._lock:
            conns, tags = list(self._conns), list(self._tags)
        yield b'{"conns":['
        for i, conn in enumerate(conns):
            yield (b"," if i else b"") + json.dumps(conn, separators=(",", ":")).encode()
        rest = {
            "dns": {},
            "connTelemetry": None,
            "domains": [],
            "routes": [],
            "compilationTelemetryByAsset": {},
            "agentConfiguration": {
                "npmEnabled": False,
                "usmEnabled": True,
                "dsmEnabled": False,
                "ccmEnabled": False,
            },
            "tags": tags,
            "connTelemetryMap": {"conns_closed": "0"},
            "kernelHeaderFetchResult": "FetchNotAttempted",
            "CORETelemetryByAsset": {},
            "PrebuiltEBPFAssets": [],
        }
        yield b"]," + json.dumps(rest, separators=(",", ":")).encode()[1:]

    @staticmethod
    def _list_doc(entries: Iterator[bytes]) -> Iterator[bytes]:
        """A JSON list written as Go's json.Encoder does: compact, newline at the end."""
        piece = [b"["]
        size = 1
        first = True
        for entry in entries:
            piece.append(entry if first else b"," + entry)
            first = False
            size += len(piece[-1])
            if size >= 1 << 16:
                yield b"".join(piece)
                piece, size = [], 0
        piece.append(b"]\n")
        yield b"".join(piece)

    @staticmethod
    def _encoded(entries: list[dict[str, Any]]) -> Iterator[bytes]:
        return (json.dumps(e, separators=(",", ":")).encode() for e in entries)

    def answer(self, target: str) -> tuple[int, Iterator[bytes]]:
        """(status, body pieces) for a request target."""
        if self.failure is not None:
            return self.failure, iter([b"internal error\n"])
        url = urlsplit(target)
        client_id = parse_qs(url.query).get("client_id", [DEFAULT_CLIENT_ID])[0]
        if url.path == "/network_tracer/debug/http_monitoring":
            if self.large_http_entries:
                return 200, self._list_doc(generated_entries_json(self.large_http_entries))
            return 200, self._list_doc(self._encoded(self._delta(client_id, "http")))
        if url.path == "/network_tracer/debug/http2_monitoring":
            if not self.http2_enabled:
                return 404, iter([b'{"error":"http2 monitoring is disabled"}'])
            return 200, self._list_doc(self._encoded(self._delta(client_id, "http2")))
        if url.path == "/network_tracer/connections":
            return 200, self._connections_doc()
        return 404, iter([b"404 page not found\n"])

    def start(self) -> SysprobeDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                double.requests.append(self.path)
                double.request_seen.set()
                if double.delay:
                    time.sleep(double.delay)
                status, pieces = double.answer(self.path)
                double._send(self, status, pieces)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # AF_UNIX peers have no address to log

        self._server = socketserver.ThreadingUnixStreamServer(str(self.socket_path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def _send(self, handler: BaseHTTPRequestHandler, status: int, pieces: Iterator[bytes]) -> None:
        head: list[bytes] = []
        size = 0
        chunked = self.chunk_size is not None
        for piece in pieces:  # buffer like net/http until it is clear the body is long
            head.append(piece)
            size += len(piece)
            if size > GO_BUFFER_BEFORE_CHUNKING:
                chunked = True
                break
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Connection", "close")
        if not chunked:
            body = b"".join(head)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            self.encodings.append("content-length")
            return
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        self.encodings.append("chunked")
        step = self.chunk_size
        for piece in (*head, *pieces):
            parts = [piece[i : i + step] for i in range(0, len(piece), step)] if step else [piece]
            for part in parts:
                if part:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        handler.wfile.write(b"0\r\n\r\n")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> SysprobeDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def two_server_sample(double: SysprobeDouble) -> None:
    """The two-server lab in the double's feed, with one planted misattribution.

    A Go client (tls.library:go) calls /server8443/... on 8443 and /server9443/... on 9443;
    one aggregate says /server8443/identify was served on 9443: the symptom of docs/background.md.
    """
    go = STATIC_TAG_GO
    lo = "127.0.0.1"
    double.add_http(
        request_summary((lo, 40100), (lo, 8443), "/server8443/identify", {200: 41}, static_tags=go),
        request_summary((lo, 40102), (lo, 9443), "/server9443/identify", {200: 39}, static_tags=go),
        request_summary((lo, 40104), (lo, 9443), "/server8443/identify", {200: 2}, static_tags=go),
        request_summary((lo, 40106), (lo, 8443), "/server8443/identify", {200: 7, 503: 1}),
    )


def write_sample(out: Path) -> None:
    """Record the two-server sample by fetching it from the double with the real kit script."""
    with tempfile.TemporaryDirectory() as tmp, SysprobeDouble(Path(tmp)) as double:
        two_server_sample(double)
        subprocess.run(
            [sys.executable, str(KIT_FETCH), "--socket", str(double.socket_path),
             "--path", "/network_tracer/debug/http_monitoring", "--out", str(out)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--write-sample":
        sys.exit("usage: sysprobe_double.py --write-sample FILE")
    write_sample(Path(sys.argv[2]))
