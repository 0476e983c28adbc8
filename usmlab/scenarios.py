"""Named scenarios as data, in the manner of Molecule's scenarios.

A scenario is a set of defaults for the workloads plus the goal it checks (taken from the seed
README). Every parameter can be overridden from the command line; validation lives here so the
CLI, the runner and the tests share one set of rules.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from usmlab.errors import UsageError

# The 8 paths the original hand-run client rotated through (field notes §3).
DEFAULT_PATHS: tuple[str, ...] = (
    "/api/v1/persistentvolumes/pvc-63958627-daf8-4858-bf79-3818733c87b4",
    "/api/v1/persistentvolumes/pvc-33641375-8db3-4ff3-b172-2ba76ce132fe",
    "/api/v1/persistentvolumes/pvc-12345678-1234-1234-1234-123456789abc",
    "/api/v1/namespaces/orgstore-maze/configmaps",
    "/api/v1/namespaces/postgres-orgstore-proposals/configmaps",
    "/api/v1/namespaces/datadog-agent/configmaps",
    "/api/v1/namespaces/zookeeper-lockness/configmaps",
    "/api/v1/namespaces/kube-system/pods",
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|us)?\s*$")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(text: str | float | int, what: str = "interval") -> float:
    """Seconds from `2s`, `500ms`, `0.1` or `1m`; the seed's Go-style flags use these forms."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise UsageError(f"malformed {what} {text!r}: use e.g. 2s, 500ms or 0.1")
        value = float(match.group(1)) * _UNIT[match.group(2)]
    if value < 0:
        raise UsageError(f"{what} must not be negative, got {text!r}")
    return value


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Params:
    """What the workloads are asked to do in one run."""

    url: str = "https://127.0.0.1:8443"
    count: int = 10
    interval: float = 1.0
    duration: float | None = None
    concurrency: int = 1
    connection: str = "new"
    paths: tuple[str, ...] = DEFAULT_PATHS

    def validate(self) -> Params:
        check_url(self.url)
        if self.count < 0:
            raise UsageError(f"count must be 0 (until stopped) or more, got {self.count}")
        if self.interval < 0:
            raise UsageError(f"interval must not be negative, got {self.interval}")
        if self.duration is not None and self.duration <= 0:
            raise UsageError(f"duration must be positive, got {self.duration}")
        if self.concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.connection not in ("new", "reuse"):
            raise UsageError(f"connection must be 'new' or 'reuse', got {self.connection!r}")
        if not self.paths or any(not p.startswith("/") for p in self.paths):
            raise UsageError("paths must be a comma-separated list of paths starting with '/'")
        return self

    @property
    def port(self) -> int:
        return check_url(self.url)[1]

    @property
    def host(self) -> str:
        return check_url(self.url)[0]

    def client_args(self) -> list[str]:
        """The client's command-line flags for these parameters."""
        args = [
            "-url", self.url,
            "-count", str(self.count),
            "-interval", f"{self.interval}",
            "--concurrency", str(self.concurrency),
            "--connection", self.connection,
            "--paths", ",".join(self.paths),
        ]  # fmt: skip
        if self.duration is not None:
            args += ["--duration", f"{self.duration}"]
        return args

    def as_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["paths"] = list(self.paths)
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
    )
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(SCENARIOS)
        raise UsageError(f"unknown scenario {name!r}: choose one of {known}") from None


def parse_paths(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())
