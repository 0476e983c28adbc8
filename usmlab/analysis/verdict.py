"""Which process was each request attributed to, and is that right: the lab's verdict.

Every request the client sent is looked for in the trace: by path and time where the message
carries a path (the built-in tracer, the manual lab README's form, anything naming a lab path), by
thread and time for USM's pathless printks. A capture in the client's threads is right, one in
the server's is the expected loopback double capture; a request the client was not credited with
but another process was is a misattribution (named: pid, tid, comm), as is one tied to the wrong
server; a request with no capture was missed. Outside processes with lab paths that concern this
lab are listed as `foreign`.

The trace is scanned once, in parallel on big files (fanout): every capture is matched on its own
(nearest request in time), so per-range tallies simply add up.
"""

from __future__ import annotations

import heapq
import operator
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from usmlab.analysis.errors import AnalysisError
from usmlab.analysis.fanout import default_workers, map_ranges, split_ranges
from usmlab.analysis.messages import (
    KINDS,
    TRAFFIC_KINDS,
    MessageEvent,
    TlsEvent,
    classify,
    is_lab_path,
    shared_event,
)
from usmlab.analysis.threads import LAB_HELPER_ROLES, Process, ThreadMap
from usmlab.analysis.trace_pipe import ParseStats, Row, TraceScanner, read_blocks

WINDOW = 0.5  # seconds a capture may fall before a request's start or after its end
SLACK = 0.02  # on a shared clock: a capture this close to a request counts as during it
_EXIT_STATUS = {"capture-works": 0, "untraced": 0, "misattribution": 1, "no-captures": 3}
# Caps that keep report.json readable on huge runs; the counts are always complete.
LIST_CAP = 50
MISSED_CAP = 200
PATHS_CAP = 20
EVENTS_BY_PROCESS_CAP = 50
# Offset estimation reads at most this much of a trace whose clock is not CLOCK_MONOTONIC.
_OFFSET_SAMPLES = 256
_OFFSET_SCAN_BYTES = 32 << 20

# Per-request flags (bits 4-6 hold the same three, shifted: claimed by a path capture):
# captured in a client, in the right server, in another process, or tied
# to the wrong server (two-server rule).
_CLIENT, _SERVER, _OTHER, _WRONG = 1, 2, 4, 8
_LAB_ROLES = frozenset({"client", "server"})
# Messages printed in the attributed process's own thread (the built-in tracer's), so the
# header's comm names that process; the README form prints in the tracer's thread instead.
_OWN_THREAD_KINDS = frozenset({"tls_write", "tls_read", "tls_read_call"})
_SERVER_IN_PATH = re.compile(r"/server(\d{1,5})(?:/|$)")
_TRAFFIC_INDEXES = frozenset(KINDS.index(k) for k in TRAFFIC_KINDS)


def exit_status(outcome: str) -> int:
    """The CLI's exit status for an outcome: 0 works/untraced, 1 misattribution, 3 none."""
    return _EXIT_STATUS[outcome]


def server_port_in_path(path: str) -> int | None:
    """`/server8443/identify` names the server that should answer it."""
    match = _SERVER_IN_PATH.match(path)
    return int(match[1]) if match else None


def attribute(threads: ThreadMap, tid: int, pid: int | None) -> tuple[int, Process | None, str]:
    """(owner key, process, role) of a trace record: the message's pid when it names one (that
    is the tracer's attribution), else the process of the header's thread. The owner key is
    the pid, or -tid for a thread nobody knows; role is client/server/helper/foreign."""
    proc = threads.process(pid) if pid is not None else threads.process_of_tid(tid)
    if proc is not None and proc.lab and proc.role in _LAB_ROLES:
        role = proc.role
    elif proc is not None and proc.lab and proc.role in LAB_HELPER_ROLES:
        role = "helper"
    else:
        role = "foreign"
    owner = pid if pid is not None else (proc.pid if proc is not None else -tid)
    return owner, proc, role


@dataclass(slots=True)
class Request:
    """One client.jsonl record (docs/formats.md), plus the server record it was joined to."""

    seq: int
    path: str
    start: float
    end: float
    pid: int | None = None
    tid: int | None = None
    method: str | None = None
    local_port: int | None = None
    remote_port: int | None = None
    status: int | None = None
    error: str | None = None
    server_pid: int | None = None
    server_tid: int | None = None
    server_port: int | None = None
    wrote: bool = True  # its bytes reached TLS (client.jsonl `wrote_request`; older logs: true)


@dataclass(slots=True)
class ServerRecord:
    """One server.jsonl record: what a server actually served."""

    mono: float
    pid: int | None
    tid: int | None
    path: str
    peer_port: int | None
    local_port: int | None


@dataclass
class LabContext:
    """What the verdict is judged against: requests, server records, threads, trace clock."""

    requests: list[Request]
    server_records: list[ServerRecord]
    threads: ThreadMap
    trace_clock: str | None = None
    tracer: str | None = None
    tracer_errors: list[str] = field(default_factory=list)
    has_client_log: bool = True
    run_tag: str | None = None  # this run's tracer tag: other tags are another usmlab tracer


@dataclass
class _Foreign:
    pid: int | None
    tid: int
    first_ts: float
    comm: str
    tids: set[int] = field(default_factory=set)
    captures: int = 0
    paths: set[str] = field(default_factory=set)
    concerns_lab: bool = False  # some capture names this lab's server or a path it served

    def add_path(self, path: str) -> None:
        """Keep the PATHS_CAP first paths in sorted order: the same whatever the scan order."""
        if path in self.paths:
            return
        self.paths.add(path)
        if len(self.paths) > PATHS_CAP:
            self.paths.remove(max(self.paths))


@dataclass
class Tally:
    """What one scan of (part of) the trace found; tallies of several parts add up."""

    flags: bytearray
    # Path captures in client processes (t, path), re-matched one to one after the scan, and
    # the requests pathless events credited to the client (kept through that re-matching).
    client_caps: list[tuple[float, str]] = field(default_factory=list)
    pathless_client: set[int] = field(default_factory=set)
    # Request index -> the earliest capture in another process / tying it to the wrong server:
    # (ts, owner, tid, comm); owner is the pid, or -tid for an unknown thread.
    other_process: dict[int, tuple[float, int, int, str]] = field(default_factory=dict)
    wrong_server: dict[int, tuple[float, int, int, str]] = field(default_factory=dict)
    foreign: dict[int, _Foreign] = field(default_factory=dict)
    # The earliest unmatched captures: a heap of (-ts, -tid, path, pid or -1, comm), so the
    # latest is dropped first and equal times still order (whatever the scan order).
    unmatched: list[tuple[float, int, str, int, str]] = field(default_factory=list)
    unmatched_count: int = 0
    kept_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    owner_comms: dict[int, str] = field(default_factory=dict)
    thread_counts: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    stats: ParseStats = field(default_factory=ParseStats)
    lab_traffic: int = 0
    lab_traffic_unmatched: int = 0
    lab_path_captures: int = 0
    other_tracer_lines: int = 0  # lines of another run's usmlab tracer: not this run's captures
    first_ts: float | None = None
    last_ts: float | None = None

    def note_unmatched(self, entry: tuple[float, int, str, int, str]) -> None:
        """Remember an unmatched capture if it is among the LIST_CAP earliest."""
        if len(self.unmatched) < LIST_CAP:
            heapq.heappush(self.unmatched, entry)
        elif entry > self.unmatched[0]:
            heapq.heapreplace(self.unmatched, entry)

    def merge(self, other: Tally) -> None:
        """Add the tally of another part of the same trace."""
        for i, bits in enumerate(other.flags):
            if bits:
                self.flags[i] |= bits
        self.client_caps.extend(other.client_caps)
        self.pathless_client |= other.pathless_client
        for mine_d, theirs in (
            (self.other_process, other.other_process),
            (self.wrong_server, other.wrong_server),
        ):
            for idx, detail in theirs.items():
                if idx not in mine_d or detail[0] < mine_d[idx][0]:
                    mine_d[idx] = detail
        for key, entry in other.foreign.items():
            mine_f = self.foreign.get(key)
            if mine_f is None:
                self.foreign[key] = entry
                continue
            if entry.first_ts < mine_f.first_ts:
                mine_f.first_ts, mine_f.tid, mine_f.comm = entry.first_ts, entry.tid, entry.comm
            mine_f.tids |= entry.tids
            mine_f.captures += entry.captures
            mine_f.concerns_lab = mine_f.concerns_lab or entry.concerns_lab
            for path in entry.paths:
                mine_f.add_path(path)
        for entry in other.unmatched:
            self.note_unmatched(entry)
        self.unmatched_count += other.unmatched_count
        for key, count in other.kept_counts.items():
            self.kept_counts[key] = self.kept_counts.get(key, 0) + count
        for owner, comm in other.owner_comms.items():
            self.owner_comms.setdefault(owner, comm)
        for key, counts in other.thread_counts.items():
            mine_c = self.thread_counts.get(key)
            if mine_c is None:
                self.thread_counts[key] = list(counts)
            else:
                for i, n in enumerate(counts):
                    mine_c[i] += n
        self.stats.merge(other.stats)
        self.lab_traffic += other.lab_traffic
        self.lab_traffic_unmatched += other.lab_traffic_unmatched
        self.lab_path_captures += other.lab_path_captures
        self.other_tracer_lines += other.other_tracer_lines
        if other.first_ts is not None:
            self.first_ts = (
                other.first_ts if self.first_ts is None else min(self.first_ts, other.first_ts)
            )
        if other.last_ts is not None:
            self.last_ts = (
                other.last_ts if self.last_ts is None else max(self.last_ts, other.last_ts)
            )


class _Timeline:
    """Requests of one key (path, thread, ...) in start order, in duration tiers so that a few
    long requests do not widen every search. Finds the request nearest to a time among those
    whose [start - WINDOW, end + WINDOW] contains it. Requests must be added in start order."""

    __slots__ = ("_tiers",)
    _LIMITS = (1.0, 10.0)

    def __init__(self) -> None:
        # Per tier: starts, ends, request indexes, longest duration.
        self._tiers: list[tuple[list[float], list[float], list[int], list[float]]] = []

    @classmethod
    def of(cls, requests: list[Request], ids: list[int]) -> _Timeline:
        """The timeline of these requests (indexes in start order), built in bulk: the
        usual case, every request shorter than a second, is one tier of three lists."""
        timeline = cls()
        starts = [requests[i].start for i in ids]
        ends = [requests[i].end for i in ids]
        longest = max(map(operator.sub, ends, starts), default=0.0)
        if longest <= cls._LIMITS[0]:
            timeline._tiers.append((starts, ends, list(ids), [max(longest, 0.0)]))
        else:
            for i, start, end in zip(ids, starts, ends, strict=True):
                timeline.add(start, end, i)
        return timeline

    def add(self, start: float, end: float, idx: int) -> None:
        """Append a request (in start order)."""
        duration = end - start
        slot = 0 if duration <= 1.0 else 1 if duration <= 10.0 else 2
        tiers = self._tiers
        while len(tiers) <= slot:
            tiers.append(([], [], [], [0.0]))
        starts, ends, ids, longest = tiers[slot]
        starts.append(start)
        ends.append(end)
        ids.append(idx)
        if duration > longest[0]:
            longest[0] = duration

    def nearest(self, t: float) -> int | None:
        """The request index nearest to `t` (0 inside [start, end]), None outside all windows."""
        best = None
        best_distance = WINDOW
        for starts, ends, ids, (longest,) in self._tiers:
            if not starts:
                continue
            i = bisect_right(starts, t)  # starts[:i] <= t < starts[i:]
            if i < len(starts):
                distance = starts[i] - t  # the first later start is the best later one
                if distance <= best_distance and (best is None or distance < best_distance):
                    best, best_distance = ids[i], distance
            j = i - 1
            # Earlier starts: the distance is t - end >= t - start - longest, which only grows.
            while j >= 0 and t - starts[j] - longest <= best_distance:
                end = ends[j]
                distance = t - end if t > end else 0.0
                if distance <= best_distance and (best is None or distance < best_distance):
                    best, best_distance = ids[j], distance
                    if distance == 0.0:
                        break
                j -= 1
        return best

    def within(self, t: float) -> list[int]:
        """Every request whose window contains `t`, nearest first."""
        found: list[tuple[float, int]] = []
        for starts, ends, ids, (longest,) in self._tiers:
            i = bisect_right(starts, t + WINDOW)
            j = i - 1
            while j >= 0 and t - starts[j] - longest <= WINDOW:
                distance = _distance(t, starts[j], ends[j])
                if distance <= WINDOW:
                    found.append((distance, ids[j]))
                j -= 1
        found.sort()
        return [idx for _, idx in found]


def _distance(t: float, start: float, end: float) -> float:
    if t < start:
        return start - t
    if t > end:
        return t - end
    return 0.0


@dataclass
class Verdict:
    """The judged result, ready for report.json (docs/report-schema.md)."""

    outcome: str
    requests: dict[str, int]
    misattributed_requests: list[dict[str, object]]
    missed_requests: list[int]
    foreign: list[dict[str, object]]
    unmatched_captures: list[dict[str, object]]
    unmatched_captures_count: int
    events_by_process: dict[str, dict[str, object]]
    message_counts: dict[str, int]
    stats: ParseStats
    clock_offset: float | None
    clock_offset_source: str
    lab_traffic_unmatched: int
    server_records_unmatched: int
    other_tracer_lines: int
    hints: list[str]
    first_ts: float | None
    last_ts: float | None


class Correlator:
    """Matches trace records against the lab's requests. Build it once (indexes, clock offset),
    then `scan(path)`; ranges of a big file are scanned in forked workers."""

    def __init__(self, ctx: LabContext, offset: float = 0.0) -> None:
        self.ctx = ctx
        self.offset = offset
        self.requests = ctx.requests
        self.threads = ctx.threads
        unexplained = _join_server_records(ctx.requests, ctx.server_records)
        self.server_records_unmatched = len(unexplained)
        # Paths this lab's servers served that its client did not send: someone else's.
        self.unexplained_paths = set(unexplained)
        self.has_server_log = bool(ctx.server_records)
        self.request_paths = {r.path for r in ctx.requests}
        # Request indexes in start order per key: by path; for pathless events by the thread
        # that handled the request, else by its process (a Go client writes from net/http's
        # goroutines, not from the worker that logged the tid).
        paths: dict[str, list[int]] = {}
        threads: dict[tuple[str, int], list[int]] = {}
        processes: dict[tuple[str, int], list[int]] = {}
        requests = ctx.requests
        for idx in sorted(range(len(requests)), key=lambda i: requests[i].start):
            req = requests[idx]
            if not req.wrote:
                # It failed connecting or in the handshake: nothing of it could be captured,
                # so no capture is matched to it (another process's capture of its path while
                # it failed is that process's own traffic, not this request misattributed).
                continue
            paths.setdefault(req.path, []).append(idx)
            if req.tid is not None:
                threads.setdefault(("client", req.tid), []).append(idx)
            if req.pid is not None:
                processes.setdefault(("client", req.pid), []).append(idx)
            if req.server_tid is not None:
                threads.setdefault(("server", req.server_tid), []).append(idx)
            if req.server_pid is not None:
                processes.setdefault(("server", req.server_pid), []).append(idx)
        self._by_path = {key: _Timeline.of(requests, ids) for key, ids in paths.items()}
        by_thread = {key: _Timeline.of(requests, ids) for key, ids in threads.items()}
        self._by_thread = by_thread
        self._by_process = {key: _Timeline.of(requests, ids) for key, ids in processes.items()}
        self.server_ports = {
            p.port for p in ctx.threads.processes(["server"]) if p.port is not None
        }
        self.watched = (
            ctx.threads.tids_of_role("client")
            | ctx.threads.tids_of_role("server")
            | {tid for _, tid in by_thread}
        )
        self._owner_cache: dict[tuple[int, int | None], tuple[int, Process | None, str]] = {}

    # -- scanning -----------------------------------------------------------------------------

    def scan(self, path: Path, workers: int | None = None) -> Tally:
        """Scan the whole trace file, in parallel when it is big, and return the summed tally."""
        size = path.stat().st_size
        parts = default_workers(size) if workers is None else max(1, workers)
        ranges = split_ranges(path, parts) if parts > 1 and size else [(0, None)]
        tallies = map_ranges(lambda start, end: self.scan_range(path, start, end), ranges)
        total = tallies[0]
        for other in tallies[1:]:
            total.merge(other)
        return total

    def scan_range(self, path: Path, start: int, end: int | None) -> Tally:
        """Scan bytes [start, end) of the trace (line-aligned) into a fresh tally."""
        tally = Tally(bytearray(len(self.requests)))
        scanner = TraceScanner(classify, len(KINDS), self.watched.__contains__, shared_event)
        with open(path, "rb", buffering=0) as source:
            for lines in read_blocks(source, start, end):
                self.consume(scanner.scan(lines), tally)
        self.consume(scanner.finish(), tally)
        tally.thread_counts = scanner.thread_counts()
        tally.stats = scanner.stats
        return tally

    def _owner(self, tid: int, pid: int | None) -> tuple[int, Process | None, str]:
        """`attribute`, cached per (tid, pid)."""
        if len(self._owner_cache) > 65536:
            self._owner_cache.clear()
        result = self._owner_cache[(tid, pid)] = attribute(self.threads, tid, pid)
        return result

    def consume(self, rows: list[Row], tally: Tally) -> None:
        """Account for records handed over by the scanner."""
        offset = self.offset
        kept = tally.kept_counts
        owner_of = self._owner_cache.get
        owner_comms = tally.owner_comms
        first, last = tally.first_ts, tally.last_ts
        run_tag = self.ctx.run_tag
        for header, head, _rest, ev in rows:
            if header is None:
                continue  # LOST: already in the scanner's stats
            if run_tag is not None and type(ev) is TlsEvent and ev.run not in (None, run_tag):
                tally.other_tracer_lines += 1  # another usmlab run's tracer printed it
                continue
            ts = float(head[header.ts_offset :])
            if first is None or ts < first:
                first = ts
            if last is None or ts > last:
                last = ts
            tid = header.tid
            owner, proc, role = owner_of((tid, ev.pid)) or self._owner(tid, ev.pid)
            if (
                owner not in owner_comms
                and header.comm != "<...>"
                and (ev.pid is None or ev.kind in _OWN_THREAD_KINDS)
            ):
                owner_comms[owner] = header.comm
            key = (owner, ev.index)
            kept[key] = kept.get(key, 0) + 1
            lab_traffic = ev.traffic and role in _LAB_ROLES
            if lab_traffic:
                tally.lab_traffic += 1
            if ev.path is not None:
                self._path_capture(tally, ts - offset, tid, header.comm, owner, proc, role, ev)
            elif lab_traffic:
                self._thread_capture(tally, ts - offset, tid, role, proc)
        tally.first_ts, tally.last_ts = first, last

    def _comm(self, tid: int, comm: str, proc: Process | None) -> str:
        if comm and comm != "<...>":
            return comm
        known = self.threads.comm_of_tid(tid) or (proc.comm if proc is not None else None)
        return known or comm

    def _concerns_lab(self, path: str) -> bool:
        """Whether another process's capture of a lab path concerns this lab rather than a
        neighbour's (the built-in tracer sees the whole machine): the path names one of this
        lab's servers, or a server of this lab served it to someone other than its client.
        Without server records nothing tells them apart: any lab path does."""
        named = server_port_in_path(path)
        if named is not None and self.server_ports:
            return named in self.server_ports
        if self.has_server_log:
            return path in self.unexplained_paths
        return True

    def _wrong_server(self, path: str, proc: Process | None, ev: MessageEvent) -> bool:
        """Two-server rule: the path names one server, the record ties it to another."""
        named = server_port_in_path(path)
        if named is None:
            return False
        dst_port = getattr(ev, "dst_port", None)
        if (
            dst_port is not None
            and dst_port != named
            and (not self.server_ports or dst_port in self.server_ports)
        ):
            return True
        return (
            proc is not None
            and proc.lab
            and proc.role == "server"
            and proc.port is not None
            and proc.port != named
        )

    def _path_capture(
        self,
        tally: Tally,
        t: float,
        tid: int,
        comm: str,
        owner: int,
        proc: Process | None,
        role: str,
        ev: MessageEvent,
    ) -> None:
        path = ev.path
        assert path is not None
        if path not in self.request_paths and not is_lab_path(path):
            return  # someone's own traffic: counted per process, nothing to judge
        tally.lab_path_captures += 1
        # Path captures claim requests one to one per side (bits above the verdict flags);
        # pathless events only mark them, so they do not take a request from a capture.
        claim = (_CLIENT if role == "client" else _SERVER if role == "server" else _OTHER) << 4
        idx = self._match_path(path, t, tid, tally.flags, claim)
        if idx is not None:
            tally.flags[idx] |= claim
        wrong = self._wrong_server(path, proc, ev)
        pid = owner if owner >= 0 else None
        if idx is None:
            tally.unmatched_count += 1
            tally.note_unmatched(
                (-t, -tid, path, -1 if pid is None else pid, self._comm(tid, comm, proc))
            )
        elif wrong:
            _note(
                tally, idx, _WRONG, tally.wrong_server, (t, owner, tid, self._comm(tid, comm, proc))
            )
        elif role == "client":
            tally.flags[idx] |= _CLIENT
            tally.client_caps.append((t, path))
        elif role == "server":
            tally.flags[idx] |= _SERVER
        else:
            _note(
                tally,
                idx,
                _OTHER,
                tally.other_process,
                (t, owner, tid, self._comm(tid, comm, proc)),
            )
        if role == "foreign":
            entry = tally.foreign.get(owner)
            if entry is None:
                entry = tally.foreign[owner] = _Foreign(pid, tid, t, self._comm(tid, comm, proc))
            elif t < entry.first_ts:
                entry.first_ts, entry.tid, entry.comm = t, tid, self._comm(tid, comm, proc)
            entry.tids.add(tid)
            entry.captures += 1
            entry.add_path(path)
            if not entry.concerns_lab and self._concerns_lab(path):
                entry.concerns_lab = True

    def _thread_capture(
        self, tally: Tally, t: float, tid: int, role: str, proc: Process | None
    ) -> None:
        timeline = self._by_thread.get((role, tid))
        if timeline is None and proc is not None:  # a thread that logged no request itself
            timeline = self._by_process.get((role, proc.pid))
        best = timeline.nearest(t) if timeline is not None else None
        if best is None:
            tally.lab_traffic_unmatched += 1
            return
        if role == "server" and proc is not None and proc.port is not None:
            named = server_port_in_path(self.requests[best].path)
            if named is not None and named != proc.port:
                _note(
                    tally,
                    best,
                    _WRONG,
                    tally.wrong_server,
                    (t, proc.pid, tid, self._comm(tid, "", proc)),
                )
                return
        tally.flags[best] |= _CLIENT if role == "client" else _SERVER
        if role == "client":
            tally.pathless_client.add(best)

    def _match_path(self, path: str, t: float, tid: int, flags: bytearray, side: int) -> int | None:
        """The request this capture belongs to: same path, its window contains t.

        Of the requests running at t that this side has not claimed yet, one of the capturing
        thread first, then the one ending first: earliest deadline first leaves later requests
        to later captures, so many concurrent requests of one path (Go churn, where writes come
        from goroutine threads, not the worker's) are matched one to one. Else the nearest
        unclaimed request, else the nearest.
        """
        timeline = self._by_path.get(path)
        if timeline is None:
            return None
        requests = self.requests
        nearest = timeline.nearest(t)
        if nearest is not None and not flags[nearest] & side:
            req = requests[nearest]
            if tid == req.tid or tid == req.server_tid:  # the usual case, decided at once
                return nearest
        candidates = [i for i in timeline.within(t) if not flags[i] & side]
        running = [i for i in candidates if requests[i].start <= t <= requests[i].end]
        if running:
            return min(
                running,
                key=lambda i: (
                    tid not in (requests[i].tid, requests[i].server_tid),
                    requests[i].end,
                    i,
                ),
            )
        if candidates:
            return candidates[0]
        return nearest

    # -- the verdict --------------------------------------------------------------------------

    def _rematch_client(self, tally: Tally) -> None:
        """Credit the client one to one, optimally, now that every capture is known.

        Scanning assigns captures as they come; with many concurrent requests of one path (Go
        churn) that can leave a request uncredited although its write is in the trace. Here
        every client capture of a path is matched to a request of that path running at that
        time (within SLACK), earliest deadline first, which maximizes the requests credited.
        Used only on a shared clock (`mono`) and only when it credits at least as many.
        """
        requests = self.requests
        by_path: dict[str, list[float]] = {}
        for t, path in tally.client_caps:
            by_path.setdefault(path, []).append(t)
        spans_of: dict[str, list[tuple[float, float, int]]] = {p: [] for p in by_path}
        for i, r in enumerate(requests):
            if r.path in spans_of:
                spans_of[r.path].append((r.start - SLACK, r.end + SLACK, i))
        credited = set(tally.pathless_client)
        for path, times in by_path.items():
            spans = sorted(spans_of[path])
            times.sort()
            running: list[tuple[float, int]] = []
            j = 0
            for t in times:
                while j < len(spans) and spans[j][0] <= t:
                    heapq.heappush(running, (spans[j][1], spans[j][2]))
                    j += 1
                while running and running[0][0] < t:
                    heapq.heappop(running)
                if running:
                    credited.add(heapq.heappop(running)[1])
        flags = tally.flags
        if len(credited) < sum(1 for b in flags if b & _CLIENT):
            return
        for i in range(len(flags)):
            flags[i] = (flags[i] | _CLIENT) if i in credited else (flags[i] & ~_CLIENT)

    def judge(self, tally: Tally, clock_offset_source: str) -> Verdict:
        """Turn a complete tally into counts, lists, outcome and hints."""
        requests = self.requests
        if clock_offset_source == "mono" and tally.client_caps:
            self._rematch_client(tally)
        flags = tally.flags
        captured_client = sum(1 for b in flags if b & _CLIENT)
        captured_server = sum(1 for b in flags if b & _SERVER)
        # Another process's capture of a request the client's threads also captured is another
        # process doing the same thing (each SSL call is captured where it happens; USM reports
        # a request once per side): only a request the client was not credited with is
        # misattributed. Tying a request to the wrong server always is.
        wrong: dict[int, tuple[tuple[float, int, int, str], str]] = {}
        for idx, detail in tally.other_process.items():
            if not flags[idx] & _CLIENT:
                wrong[idx] = (detail, "other-process")
        for idx, detail in tally.wrong_server.items():
            wrong[idx] = (detail, "wrong-server")
        # A request that failed before any HTTP was exchanged (server down mid-restart,
        # refused) could not be captured: counted as failed, not missed.
        missed_idx = [
            i
            for i, b in enumerate(flags)
            if not b and not (requests[i].error and requests[i].status is None)
        ]
        counts = {
            "sent": len(requests),
            "captured_client": captured_client,
            "captured_server": captured_server,
            "misattributed": len(wrong),
            "missed": len(missed_idx),
            "failed": sum(1 for r in requests if r.error),
        }
        # Per server port (the two-server scenarios): what each server was sent and got.
        per_server: dict[str, dict[str, int]] = {}
        missed_set = set(missed_idx)
        for idx, req in enumerate(requests):
            key = str(req.remote_port) if req.remote_port is not None else "unknown"
            row = per_server.setdefault(
                key, {"sent": 0, "captured_client": 0, "misattributed": 0, "missed": 0}
            )
            row["sent"] += 1
            row["captured_client"] += bool(flags[idx] & _CLIENT)
            row["misattributed"] += idx in wrong
            row["missed"] += idx in missed_set
        if len(per_server) > 1:
            counts["per_server"] = per_server  # type: ignore[assignment]
        misattributed_list = []
        for idx in sorted(wrong, key=lambda i: requests[i].seq)[:LIST_CAP]:
            (t, owner, tid, comm), reason = wrong[idx]
            req = requests[idx]
            misattributed_list.append(
                {
                    "seq": req.seq,
                    "path": req.path,
                    "pid": owner if owner >= 0 else None,
                    "tid": tid,
                    "comm": comm,
                    "reason": reason,
                    "ts": round(t, 6),
                }
            )
        # Outside processes with lab paths: those a misattributed request went to, and those
        # whose paths concern this lab (not a neighbouring lab on the same machine).
        blamed = {detail[0][1] for detail in wrong.values() if detail[1] == "other-process"}
        foreign = [
            {
                "pid": f.pid,
                "tid": f.tid,
                "tids": sorted(f.tids),
                "comm": f.comm,
                "captures": f.captures,
                "paths": sorted(f.paths),
            }
            for owner, f in sorted(
                tally.foreign.items(), key=lambda item: (-item[1].captures, item[1].first_ts)
            )
            if f.concerns_lab or owner in blamed
        ]
        unmatched = [
            {
                "ts": round(-t, 6),
                "pid": None if pid < 0 else pid,
                "tid": -tid,
                "comm": comm,
                "path": path,
            }
            for t, tid, path, pid, comm in sorted(tally.unmatched, reverse=True)
        ]
        events, message_counts = self._events_by_process(tally)
        outcome = self._outcome(counts, foreign, tally)
        verdict = Verdict(
            outcome=outcome,
            requests=counts,
            misattributed_requests=misattributed_list,
            missed_requests=sorted(requests[i].seq for i in missed_idx)[:MISSED_CAP],
            foreign=foreign,
            unmatched_captures=unmatched,
            unmatched_captures_count=tally.unmatched_count,
            events_by_process=events,
            message_counts=message_counts,
            stats=tally.stats,
            clock_offset=self.offset,
            clock_offset_source=clock_offset_source,
            lab_traffic_unmatched=tally.lab_traffic_unmatched,
            server_records_unmatched=self.server_records_unmatched,
            other_tracer_lines=tally.other_tracer_lines,
            hints=[],
            first_ts=tally.first_ts,
            last_ts=tally.last_ts,
        )
        verdict.hints = hints_for(verdict, self.ctx)
        return verdict

    def _outcome(
        self, counts: dict[str, int], foreign: list[dict[str, object]], tally: Tally
    ) -> str:
        if self.ctx.tracer == "none":
            return "untraced"
        if counts["misattributed"] or foreign:
            return "misattribution"
        if counts["sent"]:
            captured = counts["captured_client"] + counts["captured_server"]
            return "capture-works" if captured else "no-captures"
        lab_seen = tally.lab_traffic + tally.lab_path_captures
        for (tid, _comm), per_kind in tally.thread_counts.items():
            proc = self.threads.process_of_tid(tid)
            if proc is not None and proc.lab and proc.role in ("client", "server"):
                lab_seen += sum(per_kind[i] for i in _TRAFFIC_INDEXES)
        return "capture-works" if lab_seen else "no-captures"

    def _events_by_process(
        self, tally: Tally
    ) -> tuple[dict[str, dict[str, object]], dict[str, int]]:
        """Per process (pid, or `tid:N` when the thread is unknown): events by kind, and the
        totals by kind. A process with HTTP events that is neither client nor server is
        flagged `other: true`."""
        per_owner: dict[int, dict[str, int]] = {}
        totals = dict.fromkeys(KINDS, 0)
        comms: dict[int, str] = dict(tally.owner_comms)
        for (owner, index), count in tally.kept_counts.items():
            kind = KINDS[index]
            bucket = per_owner.setdefault(owner, {})
            bucket[kind] = bucket.get(kind, 0) + count
            totals[kind] += count
        for (tid, comm), per_kind in tally.thread_counts.items():
            proc = self.threads.process_of_tid(tid)
            owner = proc.pid if proc is not None else -tid
            if comm != "<...>":
                comms.setdefault(owner, comm)
            for index, count in enumerate(per_kind):
                if count:
                    kind = KINDS[index]
                    totals[kind] += count
                    if index:  # unknown messages are only totalled
                        bucket = per_owner.setdefault(owner, {})
                        bucket[kind] = bucket.get(kind, 0) + count
        rows = []
        for owner, kinds in per_owner.items():
            kinds.pop("unknown", None)
            if not kinds:
                continue
            proc = self.threads.process(owner) if owner >= 0 else None
            role = proc.role if proc is not None and proc.lab else None
            comm = comms.get(owner) or (proc.comm if proc is not None else None)
            if comm is None and owner < 0:
                comm = self.threads.comm_of_tid(-owner)
            rows.append(
                (
                    -sum(kinds.values()),
                    f"tid:{-owner}" if owner < 0 else str(owner),
                    {
                        "pid": owner if owner >= 0 else None,
                        "name": proc.name if proc is not None and proc.lab else None,
                        "role": role,
                        "comm": comm,
                        "counts": dict(sorted(kinds.items())),
                        "other": role not in _LAB_ROLES and any(k in TRAFFIC_KINDS for k in kinds),
                    },
                )
            )
        rows.sort(key=lambda r: (r[0], r[1]))
        events = {key: entry for _, key, entry in rows[:EVENTS_BY_PROCESS_CAP]}
        return events, {k: v for k, v in totals.items() if v}


def _note(
    tally: Tally,
    idx: int,
    flag: int,
    details: dict[int, tuple[float, int, int, str]],
    detail: tuple[float, int, int, str],
) -> None:
    """Flag a request and keep the earliest capture that explains the flag."""
    tally.flags[idx] |= flag
    current = details.get(idx)
    if current is None or detail[0] < current[0]:
        details[idx] = detail


def _join_server_records(requests: list[Request], records: list[ServerRecord]) -> set[str]:
    """Tie each server record to the client request it served (peer port + path + time);
    returns the paths of the records no request explains (someone else sent them)."""
    by_port: dict[tuple[int, str], list[int]] = {}
    for idx, req in enumerate(requests):
        if req.local_port is not None:
            by_port.setdefault((req.local_port, req.path), []).append(idx)
    unexplained: list[str] = []
    for rec in records:
        best = None
        best_distance = 0.0
        if rec.peer_port is not None:
            for idx in by_port.get((rec.peer_port, rec.path), ()):
                req = requests[idx]
                if req.start - WINDOW <= rec.mono <= req.end + WINDOW:
                    distance = _distance(rec.mono, req.start, req.end)
                    if best is None or distance < best_distance:
                        best, best_distance = idx, distance
        if best is None:
            unexplained.append(rec.path)
            continue
        req = requests[best]
        req.server_pid, req.server_tid, req.server_port = rec.pid, rec.tid, rec.local_port
    return unexplained


def apply_server_records(correlator: Correlator, tally: Tally) -> None:
    """Two-server rule on what the servers logged: a request naming one server's port but
    served on another lab server's port is misattributed (server.jsonl `local_port`)."""
    for idx, req in enumerate(correlator.requests):
        named = server_port_in_path(req.path)
        if named is None or req.server_port is None or req.server_port == named:
            continue
        if correlator.server_ports and req.server_port not in correlator.server_ports:
            continue
        proc = correlator.threads.process(req.server_pid) if req.server_pid else None
        tid = req.server_tid if req.server_tid is not None else -1
        comm = correlator.threads.comm_of_tid(tid) or (proc.comm if proc else None) or ""
        owner = req.server_pid if req.server_pid is not None else -tid
        _note(tally, idx, _WRONG, tally.wrong_server, (req.start, owner, tid, comm))


# -- clock offset -------------------------------------------------------------------------------


def estimate_offset(ctx: LabContext, trace: Path) -> tuple[float, str]:
    """Trace time minus monotonic time, when the trace clock is not CLOCK_MONOTONIC.

    Aligns the k-th capture of a path in a client thread with the k-th request of that thread
    and path (both are in time order) over the first captures, and takes the median of the
    differences. Returns (offset, source); (0.0, "assumed") when nothing could be aligned.
    """
    if ctx.trace_clock == "mono":
        return 0.0, "mono"
    if not ctx.requests or not trace.exists():
        return 0.0, "assumed"
    sequences: dict[tuple[int | None, str], list[float]] = {}
    for req in sorted(ctx.requests, key=lambda r: r.start):
        sequences.setdefault((req.tid, req.path), []).append(req.start)
        sequences.setdefault((None, req.path), []).append(req.start)
    seen: dict[tuple[int | None, str], int] = {}
    diffs: list[float] = []
    scanner = TraceScanner(classify, len(KINDS), shared=shared_event)
    with open(trace, "rb", buffering=0) as source:
        # The end may cut a line: harmless, the fragment is at worst one lost sample.
        for lines in read_blocks(source, 0, min(trace.stat().st_size, _OFFSET_SCAN_BYTES)):
            for header, head, _rest, ev in scanner.scan(lines):
                if header is None or ev.path is None or ev.kind == "tls_read":
                    continue
                if attribute(ctx.threads, header.tid, ev.pid)[2] != "client":
                    continue
                key: tuple[int | None, str] = (header.tid, ev.path)
                if key not in sequences:
                    key = (None, ev.path)
                    if key not in sequences:
                        continue
                k = seen.get(key, 0)
                seen[key] = k + 1
                if k < len(sequences[key]):
                    diffs.append(float(head[header.ts_offset :]) - sequences[key][k])
            if len(diffs) >= _OFFSET_SAMPLES:
                break
    if not diffs:
        return 0.0, "assumed"
    diffs.sort()
    middle = len(diffs) // 2
    median = diffs[middle] if len(diffs) % 2 else (diffs[middle - 1] + diffs[middle]) / 2
    return median, "estimated"


def correlate(ctx: LabContext, trace: Path | None, workers: int | None = None) -> Verdict:
    """The verdict for a lab context and its trace file (None or missing: nothing captured)."""
    if trace is not None and trace.exists():
        try:
            offset, source = estimate_offset(ctx, trace)
            correlator = Correlator(ctx, offset)
            tally = correlator.scan(trace, workers)
        except OSError as exc:
            raise AnalysisError(f"{trace}: cannot read ({exc.strerror or exc})") from None
    else:
        correlator = Correlator(ctx, 0.0)
        source = "none"
        tally = Tally(bytearray(len(ctx.requests)))
    apply_server_records(correlator, tally)
    return correlator.judge(tally, source)


def _is_bpftrace(tracer: str | None) -> bool:
    """The built-in tracer, alone or with the usm-model (its bpftrace program)."""
    return tracer is not None and (tracer == "builtin" or tracer.startswith("usm-model"))


def hints_for(verdict: Verdict, ctx: LabContext) -> list[str]:
    """What to check next, chosen from what the run shows (the manual lab's troubleshooting
    checklist, docs/background.md)."""
    hints: list[str] = []
    stats = verdict.stats
    counts = verdict.requests
    if verdict.outcome == "no-captures":
        if stats.lines == 0:
            hints.append(
                "trace_pipe.log is empty: is the tracer running and attached? "
                "`ps aux | grep usm-debugger`, `sudo bpftool prog list | grep usm`"
            )
            hints.append(
                "is trace_pipe readable (one reader only)? "
                "`sudo cat /sys/kernel/tracing/trace_pipe`"
            )
        elif not any(verdict.message_counts.get(k) for k in TRAFFIC_KINDS):
            hints.append(
                f"trace_pipe has {stats.lines} lines but no HTTP event: the uprobes may not be "
                "attached to the TLS library the client uses (Python 3.11 calls SSL_write_ex/"
                "SSL_read_ex; Go uses crypto/tls): `sudo bpftool prog list | grep usm`"
            )
            if ctx.tracer not in ("builtin", "none") and not _is_bpftrace(ctx.tracer):
                hints.append(
                    "usm-debugger does not enable HTTP/2 monitoring by default: a Go client "
                    "speaks h2 and is not captured until the config enables it"
                )
        elif verdict.lab_traffic_unmatched or verdict.unmatched_captures_count:
            hints.append(
                "HTTP events were seen in lab threads but matched no request: check the trace "
                f"clock (manifest trace_clock={ctx.trace_clock!r}, offset "
                f"{verdict.clock_offset} s, {verdict.clock_offset_source})"
            )
        else:
            hints.append(
                "HTTP events were seen, but none in the client's or server's threads: "
                "see events_by_process for who printed them"
            )
        if not ctx.has_client_log:
            hints.append("no client.jsonl: requests cannot be matched; pass the client log")
        elif counts["sent"] == 0:
            hints.append("the client sent no request: see client.log")
        elif counts["failed"] == counts["sent"]:
            port = next((r.remote_port for r in ctx.requests if r.remote_port), 8443)
            servers = [str(p.pid) for p in ctx.threads.processes(["server"])] or ["<SERVER_PID>"]
            hints.append(
                "every request failed: is the server listening and the TLS handshake working? "
                f"`netstat -tulpn | grep {port}`, `ps -p {','.join(servers)}`, see server.log"
            )
        if _is_bpftrace(ctx.tracer):
            hints.append("built-in tracer: see tracer.log for bpftrace errors")
    if ctx.tracer_errors:
        hints.append(f"tracer.log reports: {ctx.tracer_errors[0]}")
    if verdict.other_tracer_lines:
        hints.append(
            f"{verdict.other_tracer_lines} lines of this capture come from another usmlab run's "
            "tracer (another run on this machine): they are not judged as this run's captures"
        )
    if verdict.server_records_unmatched:
        hints.append(
            f"the server logged {verdict.server_records_unmatched} request(s) that no client of "
            "this run sent: someone else called this run's server (another run on its port?)"
        )
    if stats.lost_events:
        hints.append(
            f"the kernel dropped {stats.lost_events} trace events (`LOST`): missed requests "
            "may be lost records, not missed captures"
        )
    enqueue_errors = verdict.message_counts.get("enqueue_error", 0)
    if enqueue_errors:
        hints.append(
            f"USM dropped {enqueue_errors} events because a batch was full (enqueue error)"
        )
    return hints
