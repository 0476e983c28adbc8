"""Judge system-probe's own record of the lab traffic: right server, right process?

Two checks (docs/background.md, docs/sysprobe.md):

- Path vs port. The two-server lab answers `/server8443/...` on 8443 and `/server9443/...` on
  9443, so a path names the server it was sent to. An aggregate whose path names one server but
  whose server port is another is misattributed: `wrong-server` when that port is another lab
  server's, `wrong-port` when it is some other port. Lab paths that name no server (the API
  paths) are judged only by port: recorded against a port that is no lab server's, `other-port`.
  An aggregate with client and server swapped (the named port on the client side) is `flipped`:
  the right connection, seen in the wrong direction, reported apart.
- PID. /network_tracer/connections ties a tuple to the process that owns it. The client side of
  a lab aggregate's tuple must belong to a lab client process (the server side to a lab server);
  any other pid is a request attributed to the wrong process.

Dumps are deltas per fetch (system-probe resets a client's stats on every read), so counts are
summed over all of a run's files. Memory follows the number of lab connections, not the dump.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from usmlab.analysis.errors import AnalysisError
from usmlab.analysis.sysprobe_parse import (
    CONNECTIONS_DUMP,
    HTTP_DUMPS,
    Connection,
    HttpEntry,
    PidIndex,
    build_pid_index,
    dump_files,
    iter_http_entries,
)
from usmlab.jsonlines import read_jsonl
from usmlab.manifest import Manifest

SERVER_PATH = re.compile(r"^/server(\d{1,5})(?:/|$)")
MAX_LISTED = 50
MISATTRIBUTED = ("wrong-server", "wrong-port", "other-port")


def named_port(path: str) -> int | None:
    """8443 for `/server8443/identify`; None when the path names no server."""
    match = SERVER_PATH.match(path)
    return int(match.group(1)) if match else None


def judge_path(entry: HttpEntry, server_ports: set[int], lab_paths: set[str]) -> str:
    """right, flipped, wrong-server, wrong-port, other-port, or unrelated (not lab traffic)."""
    named = named_port(entry.path)
    if named is not None:
        if entry.server_port == named:
            return "right"
        if entry.client_port == named:
            return "flipped"
        return "wrong-server" if entry.server_port in server_ports else "wrong-port"
    if entry.server_port in server_ports:
        return "right"
    if entry.client_port in server_ports:
        return "flipped"
    if entry.path in lab_paths:
        return "other-port"
    return "unrelated"


def _sides(entry: HttpEntry, flipped: bool) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client end, server end) of the tuple, undoing a flip."""
    client = (entry.client_ip, entry.client_port)
    server = (entry.server_ip, entry.server_port)
    return (server, client) if flipped else (client, server)


class SysprobeVerdict:
    """Accumulates entries one by one; `summary()` is the report.json `system_probe` object."""

    def __init__(
        self,
        server_ports: Iterable[int] = (),
        client_pids: Iterable[int] = (),
        server_pids: Iterable[int] = (),
        lab_paths: Iterable[str] = (),
        pid_index: PidIndex | None = None,
    ) -> None:
        self.server_ports = set(server_ports)
        self.client_pids = set(client_pids)
        self.server_pids = set(server_pids)
        self.lab_paths = set(lab_paths)
        self.pid_index = pid_index
        self.entries = 0
        self.requests = 0
        self.by_protocol: dict[str, dict[str, int]] = {}
        self.outcomes: dict[str, dict[str, int]] = {}
        self.servers: dict[int, dict[str, int]] = {}
        self.tags: dict[str, int] = {}
        self.misattributed: list[dict[str, Any]] = []
        self.pid_counts = dict.fromkeys(
            ("checked", "client_ok", "not_client", "not_server", "no_connection", "unjudged"), 0
        )
        self.foreign: list[dict[str, Any]] = []

    def add(self, entry: HttpEntry) -> None:
        count = entry.count
        self.entries += 1
        self.requests += count
        proto = self.by_protocol.setdefault(entry.protocol, {"entries": 0, "requests": 0})
        proto["entries"] += 1
        proto["requests"] += count
        outcome = judge_path(entry, self.server_ports, self.lab_paths)
        tally = self.outcomes.setdefault(outcome, {"entries": 0, "requests": 0})
        tally["entries"] += 1
        tally["requests"] += count
        if outcome == "unrelated":
            return
        flipped = outcome == "flipped"
        client_end, server_end = _sides(entry, flipped)
        server = self.servers.setdefault(
            server_end[1], {"entries": 0, "requests": 0, "named_here": 0, "named_elsewhere": 0}
        )
        server["entries"] += 1
        server["requests"] += count
        named = named_port(entry.path)
        if named is not None:
            server["named_here" if named == server_end[1] else "named_elsewhere"] += count
        pids, conn_tags = self._check_pids(entry, client_end, server_end, count)
        for tag in set(entry.tags) | conn_tags:  # the same tag seen both ways counts once
            self.tags[tag] = self.tags.get(tag, 0) + count
        if outcome in MISATTRIBUTED and len(self.misattributed) < MAX_LISTED:
            self.misattributed.append(
                {
                    **_describe(entry, count),
                    "named_port": named,
                    "reason": outcome,
                    "client_pids": sorted(pids),
                }
            )

    def _check_pids(
        self,
        entry: HttpEntry,
        client_end: tuple[str, int],
        server_end: tuple[str, int],
        count: int,
    ) -> tuple[set[int], set[str]]:
        """Owners of the client end (and judge them); also the connection's tags."""
        if self.pid_index is None:
            return set(), set()
        index = self.pid_index
        client_side = index.owners(client_end, server_end)
        server_side = index.owners(server_end, client_end)
        tags = index.tags_of(client_end, server_end) | index.tags_of(server_end, client_end)
        counts = self.pid_counts
        counts["checked"] += 1
        if not client_side and not server_side:
            counts["no_connection"] += 1
            return client_side, tags
        strangers: set[int] = set()
        if client_side and not self.client_pids:
            counts["unjudged"] += 1  # nothing to compare with: a capture without a manifest
        elif client_side:
            strangers = client_side - self.client_pids
            counts["not_client" if strangers else "client_ok"] += 1
        if server_side and self.server_pids:
            wrong_server = server_side - self.server_pids
            if wrong_server:
                counts["not_server"] += 1
                strangers |= wrong_server
        if strangers and len(self.foreign) < MAX_LISTED:
            self.foreign.append({**_describe(entry, count), "pids": sorted(strangers)})
        return client_side, tags

    def summary(self) -> dict[str, Any]:
        wrong = {k: v for k, v in self.outcomes.items() if k in MISATTRIBUTED}
        mis_entries = sum(v["entries"] for v in wrong.values())
        mis_requests = sum(v["requests"] for v in wrong.values())
        pid_checks: dict[str, Any] = dict(self.pid_counts)
        pid_checks.update(
            available=self.pid_index is not None,
            client_pids=sorted(self.client_pids),
            server_pids=sorted(self.server_pids),
            foreign=self.foreign,
        )
        if self.pid_index is not None:
            pid_checks.update(
                connections=self.pid_index.connections, lab_connections=self.pid_index.kept
            )
        bad_pids = pid_checks["not_client"] + pid_checks["not_server"]
        lab = {k: v for k, v in self.outcomes.items() if k != "unrelated"}
        return {
            "outcome": "misattribution" if mis_entries or bad_pids else "consistent",
            "entries": self.entries,
            "requests": self.requests,
            "lab_entries": sum(v["entries"] for v in lab.values()),
            "lab_requests": sum(v["requests"] for v in lab.values()),
            "by_protocol": self.by_protocol,
            "outcomes": self.outcomes,
            "servers": {str(port): v for port, v in sorted(self.servers.items())},
            "misattributed_entries": mis_entries,
            "misattributed_requests": mis_requests,
            "misattributed": self.misattributed,
            "pid_checks": pid_checks,
            "tags": dict(sorted(self.tags.items())),
            "server_ports": sorted(self.server_ports),
        }


def _describe(entry: HttpEntry, count: int) -> dict[str, Any]:
    return {
        "protocol": entry.protocol,
        "client": f"{entry.client_ip}:{entry.client_port}",
        "server": f"{entry.server_ip}:{entry.server_port}",
        "path": entry.path,
        "method": entry.method,
        "server_port": entry.server_port,
        "requests": count,
        "by_status": {str(k): v for k, v in sorted(entry.by_status.items())},
        "tags": list(entry.tags),
    }


def lab_connection_filter(ports: set[int]) -> Any:
    """Keep connections with a lab server port at either end: the only ones entries point to."""

    def keep(conn: Connection) -> bool:
        return conn.laddr_port in ports or conn.raddr_port in ports

    return keep


def _named_ports(http_files: list[tuple[Path, str]], errors: list[str]) -> set[int]:
    """Ports named by paths, when the lab's server ports are not known (a foreign capture)."""
    ports = set()
    for path, protocol in http_files:
        try:
            for entry in iter_http_entries(path, protocol):
                port = named_port(entry.path)
                if port is not None:
                    ports.add(port)
        except AnalysisError:
            continue  # reported once, by the main pass
    return ports


def judge_dumps(
    folder: Path,
    server_ports: Iterable[int] = (),
    client_pids: Iterable[int] = (),
    server_pids: Iterable[int] = (),
    lab_paths: Iterable[str] = (),
) -> dict[str, Any]:
    """The `system_probe` summary of every dump in folder (a run's `sysprobe/`)."""
    http_files = [
        (path, protocol)
        for name, protocol in HTTP_DUMPS.items()
        for path in dump_files(folder, name)
    ]
    conn_files = dump_files(folder, CONNECTIONS_DUMP)
    errors: list[str] = []
    ports = set(server_ports) or _named_ports(http_files, errors)
    index = None
    if conn_files:
        index = build_pid_index(conn_files, lab_connection_filter(ports), errors)
    verdict = SysprobeVerdict(ports, client_pids, server_pids, lab_paths, index)
    for path, protocol in http_files:
        try:
            for entry in iter_http_entries(path, protocol):
                verdict.add(entry)
        except AnalysisError as exc:
            # One bad dump (a foreign capture cut short) must not hide the others; the
            # entries read before the damage are kept.
            errors.append(str(exc))
    summary = verdict.summary()
    summary["errors"] = errors
    summary["files"] = {
        **{name: len(dump_files(folder, name)) for name in HTTP_DUMPS},
        CONNECTIONS_DUMP: len(conn_files),
    }
    return summary


def _lab_processes(run_dir: Path, manifest: dict[str, Any]) -> tuple[set[int], set[int], set[int]]:
    """(server ports, client pids, server pids) from the manifest and threads.jsonl."""
    ports: set[int] = set(manifest.get("server_ports") or [])
    clients: set[int] = set()
    servers: set[int] = set()
    for proc in manifest.get("processes") or []:
        role, pid = proc.get("role"), proc.get("pid")
        if role == "server":
            if isinstance(pid, int):
                servers.add(pid)
            if isinstance(proc.get("port"), int):
                ports.add(proc["port"])
        elif role == "client" and isinstance(pid, int):
            clients.add(pid)
    # The sampler sees restarted workloads too, whose pids the manifest does not list.
    for record in read_jsonl(run_dir / "threads.jsonl", missing_ok=True):
        pid = record.get("pid")
        if not isinstance(pid, int):
            continue
        if record.get("role") == "client":
            clients.add(pid)
        elif record.get("role") == "server":
            servers.add(pid)
    return ports, clients, servers


def _lab_paths(manifest: Manifest) -> set[str]:
    """Distinct paths the lab clients sent (every client's log)."""
    return {
        record["path"]
        for log in manifest.client_logs
        for record in read_jsonl(log)
        if isinstance(record.get("path"), str)
    }


def summarize_run(run_dir: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """report.json's `system_probe` for a run folder, or None when it holds no dumps."""
    folder = run_dir / "sysprobe"
    if not any(dump_files(folder, n) for n in (*HTTP_DUMPS, CONNECTIONS_DUMP)):
        return None
    if manifest is None:
        manifest = Manifest.read(run_dir, missing_ok=True)
    elif not isinstance(manifest, Manifest):
        manifest = Manifest(run_dir, manifest)
    ports, clients, servers = _lab_processes(run_dir, manifest)
    return judge_dumps(folder, ports, clients, servers, _lab_paths(manifest))
