"""Read a run folder's inputs (docs/formats.md) into the analysis's records, failing in one line.

A run that ended early may lack files or end with a half-written JSON line; both are normal and
tolerated. A line that is not JSON in the middle of a file, or a manifest that is not JSON, is
corruption and stops the analysis with a message naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from usmlab.analysis.errors import AnalysisError
from usmlab.analysis.threads import ThreadMap, role_kind
from usmlab.analysis.verdict import Request, ServerRecord
from usmlab.jsonlines import iter_jsonl as _jsonl

# bpftrace prints this on machines with a low memlock limit; probes still load (docs/tracers.md).
_HARMLESS_TRACER_LINES = ("RLIMIT_MEMLOCK",)


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _port_of(remote: Any) -> int | None:
    if not isinstance(remote, str):
        return None
    port = remote.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def read_client_log(path: Path) -> list[Request]:
    """client.jsonl: one Request per line, ordered by start time."""
    requests = []
    for number, item in _jsonl(path):
        get = item.get
        try:
            start = float(item["start_mono"])
            end = get("end_mono")
            end = start if end is None else float(end)
            method = get("method")
            error = get("error")
            requests.append(
                Request(
                    int(get("seq", number - 1)),
                    str(item["path"]),
                    start,
                    end if end > start else start,
                    _int(get("pid")),
                    _int(get("tid")),
                    method if type(method) is str else None,
                    _int(get("local_port")),
                    _port_of(get("remote")),
                    _int(get("status")),
                    str(error) if error else None,
                    wrote=get("wrote_request") is not False,
                )
            )
        except (KeyError, TypeError, ValueError):
            raise AnalysisError(
                f"{path}: line {number} is not a request record (needs path, start_mono)"
            ) from None
    requests.sort(key=lambda r: (r.start, r.seq))
    return requests


def read_server_log(path: Path) -> list[ServerRecord]:
    """server.jsonl: what each server served."""
    records = []
    for number, item in _jsonl(path):
        get = item.get
        try:
            records.append(
                ServerRecord(
                    float(item["mono"]),
                    _int(get("pid")),
                    _int(get("tid")),
                    str(item["path"]),
                    _int(get("peer_port")),
                    _int(get("local_port")),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise AnalysisError(
                f"{path}: line {number} is not a server record (needs mono, path)"
            ) from None
    return records


def add_manifest_processes(threads: ThreadMap, manifest: dict[str, Any]) -> None:
    """The manifest's processes are the lab: name, role kind, pid, and a server's port."""
    processes = manifest.get("processes") or []
    if not isinstance(processes, list):
        raise AnalysisError("manifest.json: `processes` is not a list")
    for proc in processes:
        if not isinstance(proc, dict) or _int(proc.get("pid")) is None:
            continue
        name = str(proc.get("name") or proc.get("role") or "process")
        role = proc.get("role") if isinstance(proc.get("role"), str) else role_kind(name)
        threads.add_process(proc["pid"], name, role, port=_int(proc.get("port")))


def add_workload_threads(
    threads: ThreadMap, requests: list[Request], records: list[ServerRecord]
) -> None:
    """The workloads log their own pid/tid per request: those threads are certainly theirs."""
    clients = {(r.pid, r.tid) for r in requests if r.pid is not None}
    servers = {(r.pid, r.tid, r.local_port) for r in records if r.pid is not None}
    for pid, tid in sorted(clients, key=str):
        proc = threads.process(pid)
        if proc is None or not proc.lab:
            threads.add_process(pid, "client", "client")
        if tid is not None:
            threads.add_thread(tid, pid)
    for pid, tid, port in sorted(servers, key=str):
        proc = threads.process(pid)
        if proc is None or not proc.lab:
            threads.add_process(pid, "server", "server", port=port)
        elif proc.port is None and port is not None:
            proc.port = port
        if tid is not None:
            threads.add_thread(tid, pid)


def read_threads_jsonl(threads: ThreadMap, path: Path) -> None:
    """threads.jsonl from the thread sampler: every (pid, tid) of the lab's processes."""
    for number, item in _jsonl(path):
        pid, tid = _int(item.get("pid")), _int(item.get("tid"))
        if pid is None or tid is None:
            raise AnalysisError(f"{path}: line {number} is not a thread record (pid, tid)")
        threads.add_sampled(pid, tid, item.get("name"), item.get("role"), item.get("comm"))


def read_thread_source(threads: ThreadMap, path: Path) -> None:
    """threads.jsonl, or the saved output of `ps -eLo pid,tid,comm` (told apart by content)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AnalysisError(f"{path}: cannot read ({exc.strerror})") from None
    if text.lstrip().startswith("{"):
        read_threads_jsonl(threads, path)
    elif threads.load_ps_text(text) == 0 and text.strip():
        raise AnalysisError(f"{path}: neither threads.jsonl nor `ps -eLo pid,tid,comm` output")


def tracer_errors(path: Path) -> list[str]:
    """Error lines from tracer.log (bpftrace/usm-debugger), harmless warnings left out."""
    if not path.exists():
        return []
    found = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            text = line.strip()
            lowered = text.lower()
            if ("error" in lowered or "failed" in lowered) and not any(
                h in text for h in _HARMLESS_TRACER_LINES
            ):
                found.append(text[:300])
                if len(found) >= 5:
                    break
    return found
