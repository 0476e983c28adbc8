#!/usr/bin/env python3
"""HTTPS server that looks like the Kubernetes API, for the USM misattribution lab.

It is copied onto a target and run with a bare ``python3`` (3.8+, standard library only), so it
imports nothing from usmlab but its sibling ``labkit``. Every request served becomes one JSON
line in ``--log`` (format in docs/formats.md): the analysis matches what the server saw
against what the client sent and what the tracer attributed.
"""

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Dict, List, Optional, Tuple

if __package__:  # imported on the controller as usmlab.kit.server
    from . import labkit
else:  # run on the target, where labkit.py is deployed beside this script
    import labkit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8443
# A TLS handshake that has not finished by then is from a stuck or hostile peer.
HANDSHAKE_TIMEOUT_S = 10.0
# Idle keep-alive connections are closed after this; reuse-mode clients reconnect.
KEEPALIVE_TIMEOUT_S = 75.0
EXIT_USAGE = 2
EXIT_ADDRESS_IN_USE = 98
EXIT_LISTEN_FAILED = 1

CREATION_TIMESTAMP = "2024-01-15T10:00:00Z"
RESOURCE_VERSION = "104857"
PERSISTENT_VOLUME_NAMES = (
    "pvc-63958627-daf8-4858-bf79-3818733c87b4",
    "pvc-33641375-8db3-4ff3-b172-2ba76ce132fe",
    "pvc-12345678-1234-1234-1234-123456789abc",
)
NAMESPACE_NAMES = (
    "default",
    "kube-system",
    "datadog-agent",
    "orgstore-maze",
    "postgres-orgstore-proposals",
    "zookeeper-lockness",
)

JsonObject = Dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Kubernetes look-alike objects: realistic enough that the bytes on the wire resemble the
# production traffic (kube API JSON), deterministic so that runs are comparable.


def object_metadata(name: str, namespace: Optional[str] = None) -> JsonObject:
    """Metadata block of a namespaced or cluster object (uid is stable per name)."""
    meta: JsonObject = {
        "name": name,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, "usmlab/{}/{}".format(namespace or "", name))),
        "resourceVersion": RESOURCE_VERSION,
        "creationTimestamp": CREATION_TIMESTAMP,
    }
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def persistent_volume(name: str) -> JsonObject:
    """A bound PersistentVolume named ``name``."""
    return {
        "kind": "PersistentVolume",
        "apiVersion": "v1",
        "metadata": object_metadata(name),
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "gp2",
            "volumeMode": "Filesystem",
        },
        "status": {"phase": "Bound"},
    }


def object_list(kind: str, items: List[JsonObject]) -> JsonObject:
    """A ``<Kind>List`` wrapper as the API server returns it."""
    return {
        "kind": kind,
        "apiVersion": "v1",
        "metadata": {"resourceVersion": RESOURCE_VERSION},
        "items": items,
    }


def namespace(name: str) -> JsonObject:
    """An active Namespace."""
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": object_metadata(name),
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def config_maps(ns: str) -> List[JsonObject]:
    """The ConfigMaps every namespace has (the cluster CA bundle) plus one app config."""
    return [
        {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": object_metadata("kube-root-ca.crt", ns),
            "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n"},
        },
        {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": object_metadata(ns + "-config", ns),
            "data": {"log_level": "info"},
        },
    ]


def pods(ns: str) -> List[JsonObject]:
    """One running pod in ``ns``."""
    return [
        {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": object_metadata(ns + "-0", ns),
            "spec": {"containers": [{"name": "main", "image": "registry.local/" + ns + ":1"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.10"},
        }
    ]


def failure_status(code: int, message: str) -> JsonObject:
    """The ``Status`` object the API server returns with an error code."""
    try:
        reason = HTTPStatus(code).phrase.replace(" ", "")
    except ValueError:
        reason = "Unknown"
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def route(path: str, port: int, pid: int, name: str) -> Tuple[int, JsonObject]:
    """Answer a GET of ``path`` (query string ignored): (HTTP status, JSON body).

    ``/server<port>/identify`` only answers for this server's own port so that a request that
    was meant for another server (the misattribution the lab hunts) is visible as a 404.
    """
    bare = path.split("?", 1)[0]
    parts = bare.strip("/").split("/")
    if all(parts):
        if parts == ["server{}".format(port), "identify"]:
            return 200, {"kind": "ServerIdentity", "port": port, "pid": pid, "name": name}
        if len(parts) == 2 and parts[0].startswith("server") and parts[1] == "identify":
            message = "this is server{} (port {}), not {}".format(port, port, parts[0])
            return 404, failure_status(404, message)
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
            if rest == ["persistentvolumes"]:
                items = [persistent_volume(n) for n in PERSISTENT_VOLUME_NAMES]
                return 200, object_list("PersistentVolumeList", items)
            if len(rest) == 2 and rest[0] == "persistentvolumes":
                return 200, persistent_volume(rest[1])
            if rest == ["namespaces"]:
                return 200, object_list("NamespaceList", [namespace(n) for n in NAMESPACE_NAMES])
            if len(rest) == 3 and rest[0] == "namespaces" and rest[2] == "configmaps":
                return 200, object_list("ConfigMapList", config_maps(rest[1]))
            if len(rest) == 3 and rest[0] == "namespaces" and rest[2] == "pods":
                return 200, object_list("PodList", pods(rest[1]))
    return 404, failure_status(404, "the server could not find the requested resource")


# ---------------------------------------------------------------------------------------------
# Serving


class LabRequestHandler(BaseHTTPRequestHandler):
    """Answers API look-alike GETs over HTTP/1.1 keep-alive and logs each request."""

    protocol_version = "HTTP/1.1"
    server_version = "usmlab-server/1"
    sys_version = ""
    timeout = KEEPALIVE_TIMEOUT_S
    # Buffered writes, flushed once per response: headers and body leave in one TLS record
    # (separate small writes meet Nagle + delayed ACK and cost 40 ms on keep-alive).
    wbufsize = 64 * 1024
    server: "LabServer"

    request_mono: Optional[float] = None
    request_wall: Optional[float] = None

    def parse_request(self) -> bool:
        # Called right after the request line was read: that instant is the request's time.
        self.request_mono = time.monotonic()
        self.request_wall = time.time()
        return super().parse_request()

    def do_GET(self) -> None:
        status, body = route(self.path, self.server.port, self.server.pid, self.server.name)
        self._respond(status, body)

    def _method_not_allowed(self) -> None:
        # The request may carry a body we do not read: close rather than desynchronise.
        self.close_connection = True
        message = "method {} is not allowed on {}".format(self.command, self.path)
        self._respond(405, failure_status(405, message))

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _method_not_allowed
    do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None):
        """Malformed requests and unknown methods get a k8s-style Status too, and are logged."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            code = 405
            message = "method {} is not allowed".format(self.command)
        self._respond(code, failure_status(code, message or HTTPStatus(code).phrase))

    def _respond(self, status: int, body_obj: JsonObject) -> None:
        body = json.dumps(body_obj).encode("utf-8")
        # Logged before answering: once a client holds its response, the server line exists
        # (and a request whose answer could not be delivered is still on record).
        self.server.record_request(self, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log: record_request prints one line instead."""


class LabServer(HTTPServer):
    """One thread per TLS connection; TLS handshakes happen in that thread, not the acceptor."""

    # The default backlog of 5 drops SYNs under concurrent new connections (1 s retransmit).
    request_queue_size = 128

    def __init__(
        self,
        address: Tuple[str, int],
        family: int,
        tls_context: ssl.SSLContext,
        log: labkit.JsonLinesLog,
        name: Optional[str],
    ) -> None:
        self.address_family = family
        self.tls_context = tls_context
        self.log = log
        self.pid = os.getpid()
        self._accepted = 0
        self._served = 0
        self._count_lock = threading.Lock()
        self._print_lock = threading.Lock()
        self._connection = threading.local()
        super().__init__(address, LabRequestHandler)
        self.port = int(self.socket.getsockname()[1])
        self.name = name or "server{}".format(self.port)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN, which can stall without DNS: skip it.
        super(HTTPServer, self).server_bind()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    @property
    def requests_served(self) -> int:
        with self._count_lock:
            return self._served

    def process_request(self, request: Any, client_address: Any) -> None:
        self._accepted += 1  # only the acceptor thread touches this counter
        conn_id = "{}-{}".format(self.pid, self._accepted)
        worker = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address, conn_id),
            name="conn-" + conn_id,
            daemon=True,
        )
        worker.start()

    def _serve_connection(self, raw: socket.socket, client_address: Any, conn_id: str) -> None:
        peer = labkit.format_address(client_address[0], client_address[1])
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            tls = self.tls_context.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as exc:
            self.say("TLS handshake with {} failed: {}".format(peer, labkit.one_line(exc)))
            raw.close()
            return
        self._connection.conn_id = conn_id
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except OSError:
            pass  # peer reset or timed out mid-request: nothing to answer
        finally:
            self.shutdown_request(tls)

    def record_request(self, handler: LabRequestHandler, status: int) -> None:
        """One server.jsonl line plus one stdout line per response sent."""
        now_mono, now_wall = time.monotonic(), time.time()
        mono = handler.request_mono if handler.request_mono is not None else now_mono
        wall = handler.request_wall if handler.request_wall is not None else now_wall
        path = getattr(handler, "path", None)
        record = {
            "wall": wall,
            "mono": mono,
            "pid": self.pid,
            "tid": threading.get_native_id(),
            "method": handler.command,
            "path": path,
            "peer_addr": handler.client_address[0],
            "peer_port": handler.client_address[1],
            "local_port": self.port,
            "status": status,
            "conn_id": getattr(self._connection, "conn_id", None),
        }
        self.log.write(record)
        with self._count_lock:
            self._served += 1
        self.say(
            "{} {} -> {} (conn {}, peer {})".format(
                handler.command,
                path,
                status,
                record["conn_id"],
                labkit.format_address(record["peer_addr"], record["peer_port"]),
            )
        )

    def say(self, line: str) -> None:
        """Print one line to stdout without interleaving with other threads."""
        # stdout gone (closed pipe): serving matters more than printing
        with self._print_lock, contextlib.suppress(OSError, ValueError):
            print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = labkit.OneLineArgumentParser(
        description="HTTPS Kubernetes-API look-alike for the USM lab.", allow_abbrev=False
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--cert", required=True, help="server certificate (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--log", default=None, help="server.jsonl path (appended to)")
    parser.add_argument("--name", default=None, help="name returned by /server<port>/identify")
    return parser


def resolve_family(host: str, port: int) -> int:
    """Address family for ``host`` (``::1`` -> IPv6); ValueError if it cannot be resolved."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError("cannot resolve host {!r}: {}".format(host, exc.strerror)) from None
    return int(infos[0][0])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print("error: --port must be between 0 and 65535", file=sys.stderr)
        return EXIT_USAGE

    tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        tls_context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        print(
            "ERROR: cannot load certificate/key: {}".format(labkit.one_line(exc)), file=sys.stderr
        )
        return EXIT_USAGE
    try:
        family = resolve_family(args.host, args.port)
    except ValueError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        log = labkit.JsonLinesLog(args.log)
    except OSError as exc:
        print(
            "ERROR: cannot open log {}: {}".format(args.log, labkit.one_line(exc)), file=sys.stderr
        )
        return EXIT_USAGE

    where = labkit.format_address(args.host, args.port)
    try:
        server = LabServer((args.host, args.port), family, tls_context, log, args.name)
    except OSError as exc:
        log.close()
        if exc.errno == errno.EADDRINUSE:
            print(
                "ERROR: cannot listen on {}: address already in use".format(where), file=sys.stderr
            )
            return EXIT_ADDRESS_IN_USE
        reason = (exc.strerror or str(exc)).lower()
        print("ERROR: cannot listen on {}: {}".format(where, reason), file=sys.stderr)
        return EXIT_LISTEN_FAILED

    stopping = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever to return, so it must run outside this thread.
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    shown = (
        ":{}".format(server.port)
        if args.host == DEFAULT_HOST
        else labkit.format_address(args.host, server.port)
    )
    print("Starting TLS server on {} (PID: {})".format(shown, server.pid), flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        log.close()
    server.say("Server stopped: {} requests served".format(server.requests_served))
    return 0


if __name__ == "__main__":
    sys.exit(main())
