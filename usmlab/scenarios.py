"""Named scenarios as data, in the manner of Molecule's scenarios.

A scenario is a set of defaults for the workloads plus the goal it checks (the original hand-run
lab's three, then the hypotheses). Every parameter can be overridden from the command line;
validation lives here (with the workloads' own grammar, kit/labkit.py) so the CLI, the runner
and the workloads share one set of rules. A scenario's behaviours are features (run/features.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from usmlab.certs import SERVER_IPS, SERVER_NAMES
from usmlab.errors import UsageError
from usmlab.kit import labkit

# The 8 paths the original hand-run client rotated through (docs/background.md); the workloads'
# shared module holds the one list.
DEFAULT_PATHS: tuple[str, ...] = tuple(labkit.DEFAULT_PATHS)


def parse_duration(text: str | float | int, what: str = "interval") -> float:
    """Seconds from `2s`, `500ms`, `1m30s` or `0.1`: the workloads' own grammar (labkit), so
    the CLI refuses exactly what they would."""
    if isinstance(text, int | float):
        value = float(text)
        if value < 0:
            raise UsageError(f"{what} must not be negative, got {text!r}")
        return value
    try:
        return labkit.parse_duration(str(text))
    except ValueError as exc:
        raise UsageError(f"malformed {what}: {exc}") from None


def check_url(url: str) -> tuple[str, int]:
    """Host and port of an https URL; the lab only speaks TLS to loopback addresses."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"malformed URL {url!r}: bad port") from None
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"malformed URL {url!r}: expected https://HOST[:PORT]")
    host = parts.hostname
    if not _is_loopback(host):
        raise UsageError(f"URL host {host!r} is not loopback (127.0.0.0/8, ::1, localhost)")
    return host, port or 443


def check_certificate_covers(host: str) -> None:
    """The lab certificate names only these hosts: a client would refuse any other."""
    names = {*SERVER_NAMES, *(str(ipaddress.ip_address(ip)) for ip in SERVER_IPS)}
    with contextlib.suppress(ValueError):  # a name, not an address
        host = str(ipaddress.ip_address(host))
    if host not in names:
        raise UsageError(
            f"the lab certificate does not name {host}: use one of {', '.join(sorted(names))}"
        )


def check_served(paths: tuple[str, ...], ports: tuple[int, ...]) -> None:
    """Every request the client will send is one the lab server answers (200): a path the
    server does not serve would make a run of 404s, judged as if it were traffic."""
    from usmlab.kit.server import route

    for template in paths:
        for port in ports:
            path = labkit.expand_path(template, port)
            if route(path, port, 0, "check")[0] != 200:
                served = "/api/v1/persistentvolumes[/NAME], /api/v1/namespaces[/NS/configmaps|pods]"
                raise UsageError(
                    f"the lab server on port {port} does not serve {path}: use {served} or "
                    "/server{port}/identify"
                )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CLIENT_KINDS = ("python", "go")
SERVER_KINDS = ("python", "go")
RESTART_KINDS = ("client", "server", "both")
GO_ONLY = ("transport_per_request", "skip_close", "gc_every", "http2", "close_nothing")


@dataclass(frozen=True)
class Params:
    """What the workloads are asked to do in one run.

    The defaults are the original lab's single Python client against a single server; the fields
    after `paths` describe the hypothesis scenarios (docs/background.md).
    """

    url: str = "https://127.0.0.1:8443"
    count: int = 10
    interval: float = 1.0
    duration: float | None = None
    concurrency: int = 1
    connection: str = "new"
    paths: tuple[str, ...] = DEFAULT_PATHS
    client: str = "python"
    server: str = "python"  # the server workload: server.py, or the Go server (kit/go_server)
    servers: tuple[int, ...] = ()  # ports; empty: the URL's port
    clients: int = 1  # client processes, each with its own paths
    python_clients: int = 0  # Go runs: Python client processes beside the Go ones
    transport_per_request: bool = False  # Go: a new http.Transport per request
    skip_close: float = 0.0  # Go: share of response bodies left unclosed
    gc_every: int = 0  # Go: runtime.GC() every N requests
    http2: bool = False  # Go: allow h2
    close_nothing: bool = False  # Go: raw TLS, every connection dropped without Close
    restart: str | None = None  # kill and respawn: client, server or both
    restart_after: float = 2.0  # seconds into the traffic
    preexisting: float = 0.0  # seconds of traffic before the tracer attaches
    nat_vip: str | None = None  # loopback HOST:PORT DNAT'ed to the (first) server
    ephemeral_server: bool = False  # servers listen inside the ephemeral port range
    same_layout: bool = False  # Python: clients run with address randomization off

    def validate(self) -> Params:
        """Every rule in one place, before anything is deployed; a UsageError names the first
        one broken. Counts, durations and paths follow the workloads' own rules (labkit)."""
        host, _ = check_url(self.url)
        if self.nat_vip is None:
            check_certificate_covers(host)
        try:
            labkit.check_count(self.count)
            labkit.check_concurrency(self.concurrency)
            if self.interval:
                labkit.check_duration(self.interval, "interval")
            if self.duration is not None:
                labkit.check_duration(self.duration)
            labkit.check_paths(tuple(self.paths))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.connection not in ("new", "reuse"):
            raise UsageError(f"connection must be 'new' or 'reuse', got {self.connection!r}")
        if self.client not in CLIENT_KINDS:
            raise UsageError(f"client must be python or go, got {self.client!r}")
        if self.server not in SERVER_KINDS:
            raise UsageError(f"server must be python or go, got {self.server!r}")
        if any(not 0 < p < 65536 for p in self.servers) or len(set(self.servers)) != len(
            self.servers
        ):
            raise UsageError("servers must be distinct TCP ports, e.g. 8443,9443")
        if self.clients < 1:
            raise UsageError(f"clients must be at least 1, got {self.clients}")
        if self.python_clients < 0:
            raise UsageError(f"python-clients must not be negative, got {self.python_clients}")
        if self.python_clients and self.client != "go":
            raise UsageError("--python-clients: beside Go clients only (--client go); "
                             "for more Python clients use --clients")  # fmt: skip
        if self.python_clients and self.nat_vip is not None:
            raise UsageError("--python-clients: not with a NAT'ed address (the Python clients "
                             "verify the lab certificate, which does not name it)")  # fmt: skip
        if not 0 <= self.skip_close <= 1:
            raise UsageError(f"skip-close must be between 0 and 1, got {self.skip_close}")
        if self.gc_every < 0:
            raise UsageError(f"gc-every must not be negative, got {self.gc_every}")
        if self.client != "go":
            used = [f for f in GO_ONLY if getattr(self, f) != getattr(Params, f)]
            if used:
                flags = ", ".join("--" + f.replace("_", "-") for f in used)
                raise UsageError(f"{flags}: only the Go client has this (--client go)")
        if self.same_layout and self.client != "python":
            raise UsageError("--same-layout: only the Python client has this (--client python)")
        if self.restart is not None and self.restart not in RESTART_KINDS:
            raise UsageError(f"restart must be client, server or both, got {self.restart!r}")
        if self.restart_after < 0 or self.preexisting < 0:
            raise UsageError("restart-after and preexisting must not be negative")
        if self.nat_vip is not None:
            check_url(f"https://{self.nat_vip}")
        if self.clients == 1:  # several clients get paths of their own (run/features.py)
            check_served(self.paths, self.ports)
        return self

    @property
    def port(self) -> int:
        return check_url(self.url)[1]

    @property
    def host(self) -> str:
        return check_url(self.url)[0]

    @property
    def ports(self) -> tuple[int, ...]:
        """The server ports of the run, first one first."""
        return self.servers or (self.port,)

    def client_args(self, urls: list[str], paths: tuple[str, ...] | None = None) -> list[str]:
        """The client's command-line flags (both clients take the same ones)."""
        args = [
            "-url", ",".join(urls),
            "-count", str(self.count),
            "-interval", f"{self.interval}",
            "--concurrency", str(self.concurrency),
            "--connection", self.connection,
            "--paths", ",".join(paths or self.paths),
        ]  # fmt: skip
        if self.duration is not None:
            args += ["--duration", f"{self.duration}"]
        if self.transport_per_request:
            args.append("--transport-per-request")
        if self.skip_close:
            args += ["--skip-close", f"{self.skip_close}"]
        if self.gc_every:
            args += ["--gc-every", str(self.gc_every)]
        if self.http2:
            args.append("--http2")
        if self.close_nothing:
            args.append("--close-nothing")
        return args

    def as_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["paths"] = list(self.paths)
        data["servers"] = list(self.ports)
        return data


@dataclass(frozen=True)
class Scenario:
    name: str
    goal: str
    description: str
    params: Params = field(default_factory=Params)

    def with_overrides(self, **overrides: object) -> Params:
        """The scenario's parameters with the user's non-None overrides applied, validated."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self.params, **given).validate()


IDENTIFY = ("/server{port}/identify",)
# The Go churn that reproduced the bug in the field: two servers, a new transport per request.
CHURN = Params(
    count=2000,
    interval=0.0,
    concurrency=20,
    client="go",
    servers=(8443, 9443),
    paths=IDENTIFY,
    transport_per_request=True,
    skip_close=0.2,
    gc_every=50,
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="scenario1",
            goal="Verify eBPF captures requests with correct PID",
            description="Basic validation: 10 requests, one per second.",
            params=Params(count=10, interval=1.0),
        ),
        Scenario(
            name="scenario2",
            goal="Sustained traffic to test for sporadic issues",
            description="Continuous load: a request every 500 ms until Ctrl-C or --duration.",
            params=Params(count=0, interval=0.5),
        ),
        Scenario(
            name="scenario3",
            goal="High-frequency requests to stress test",
            description="Burst traffic: 100 requests, one every 100 ms.",
            params=Params(count=100, interval=0.1),
        ),
        Scenario(
            name="churn",
            goal="Reproduce the Go-TLS misattribution (tls.Conn address reuse)",
            description=(
                "The reproduction from the field: a Go crypto/tls client, a new transport per "
                "request, 20 workers, 20% of bodies left unclosed, GC every 50 requests, two "
                "servers (8443, 9443) each answering a path that names it."
            ),
            params=CHURN,
        ),
        Scenario(
            name="address-reuse",
            goal="Does skipping Body.Close leave tls.Conn entries that a reused address meets?",
            description=(
                "The churn client against two servers with a share of bodies left unclosed "
                "and GC every 10 requests; run it with --tracer usm-model[:KEY] and sweep the "
                "share: --sweep skip_close=0,0.1,0.3,1. Reports, per setting, address reuse "
                "while an entry was alive and stale tuples, beside the prediction from the "
                "client logs (--close-nothing: connections dropped without Close at all)."
            ),
            params=dataclasses.replace(CHURN, skip_close=0.3, gc_every=10),
        ),
        Scenario(
            name="cross-process",
            goal="Are one Go client's requests recorded against another process's connection?",
            description=(
                "The production pattern: three identical Go churn clients side by side on one "
                "node, a Python client making its own TLS connections next to them, and every "
                "client killed (no cleanup) and restarted with new PIDs mid-traffic. Go heaps "
                "start at fixed addresses, so identical processes, and a restarted one, "
                "allocate their tls.Conn (and netFD) at the same addresses; a cache key without "
                "the pid meets another process's live entry, or a dead one's. Run it with "
                "--tracer usm-model[:KEY]: cross_process_collisions, per key."
            ),
            params=dataclasses.replace(
                CHURN,
                count=1000,
                concurrency=10,
                clients=3,
                paths=DEFAULT_PATHS,
                python_clients=1,
                restart="client",
                restart_after=1.5,
            ),
        ),
        Scenario(
            name="openssl-reuse",
            goal="Are one Python process's requests recorded against another's connection?",
            description=(
                "The ssl_sock_by_ctx case: three identical Python clients on keep-alive "
                "connections to two servers, run with address randomization off (as workers "
                "forked from one parent are), so they allocate their OpenSSL SSL objects at the "
                "same addresses. An entry keyed by the SSL* alone is taken over by another "
                "process's SSL_set_fd; keyed with the pid, it is not. Run it with --tracer "
                "usm-model:pointer and :pid-pointer, and --no-same-layout for the default."
            ),
            params=Params(
                count=200,
                interval=0.0,
                connection="reuse",
                clients=3,
                servers=(8443, 9443),
                same_layout=True,
            ),
        ),
        Scenario(
            name="fd-reuse",
            goal="Does the (pid, fd) cache hand a reused fd number its old tuple?",
            description=(
                "One Go worker reuses fd numbers at once: every connection is dropped without "
                "Close, its socket closed by the runtime's finalizer on another thread at the "
                "next GC (every request), and the client is killed and respawned mid-traffic. "
                "Run it with --tracer usm-model:pointer-fd (misses go to the fd cache): "
                "stale_by_cache.fd."
            ),
            params=dataclasses.replace(
                CHURN,
                count=0,
                duration=8.0,
                interval=0.01,
                concurrency=1,
                skip_close=0.0,
                gc_every=1,
                close_nothing=True,
                restart="client",
                restart_after=4.0,
            ),
        ),
        Scenario(
            name="restart",
            goal="Do process restarts mid-traffic leave stale attributions?",
            description=(
                "Client and server killed and respawned mid-traffic with new PIDs, as when a "
                "CronJob restart lined up with misattributions in production."
            ),
            params=Params(count=0, duration=6.0, interval=0.05, restart="both", restart_after=3.0),
        ),
        Scenario(
            name="preexisting",
            goal="Are connections that existed before the tracer attached misattributed?",
            description=(
                "Traffic on keep-alive connections starts 2 s before the tracer attaches and "
                "goes on after it."
            ),
            params=Params(
                count=0,
                duration=5.0,
                interval=0.05,
                connection="reuse",
                concurrency=2,
                preexisting=2.0,
            ),
        ),
        Scenario(
            name="nat",
            goal="Does a virtual IP DNAT'ed to the server confuse attribution?",
            description=(
                "The client calls 127.0.0.42:443, DNAT'ed (nftables, root only) to the server "
                "on 127.0.0.1:8443, like a Kubernetes service address. Rules are removed "
                "afterwards, even on Ctrl-C."
            ),
            params=Params(count=50, interval=0.05, nat_vip="127.0.0.42:443"),
        ),
        Scenario(
            name="ephemeral-port-server",
            goal="Does a server port inside the ephemeral range flip client/server direction?",
            description=(
                "The server listens on a free port inside ip_local_port_range, where USM's "
                "direction heuristic may take it for the client side."
            ),
            params=Params(count=50, interval=0.05, ephemeral_server=True),
        ),
        Scenario(
            name="multi-client",
            goal="With several client processes, is each request attributed to its own client?",
            description="Three client processes at once, each with paths of its own.",
            params=Params(count=30, interval=0.05, clients=3),
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(SCENARIOS)
        raise UsageError(f"unknown scenario {name!r}: choose one of {known}") from None


def parse_ports(text: str) -> tuple[int, ...]:
    """`8443,9443` → (8443, 9443); Params.validate() checks the range."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UsageError(f"malformed port list {text!r}: use e.g. 8443,9443") from None


def parse_paths(text: str) -> tuple[str, ...]:
    """`/a,/b` → ("/a", "/b"), by the client's own rules (labkit.check_paths)."""
    try:
        return labkit.parse_paths(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
