"""The verdict on small run folders written per docs/formats.md: who got each request."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
from labrun import run_usmlab

from usmlab.analysis.errors import AnalysisError
from usmlab.analysis.report import (
    analyze_capture,
    analyze_run,
    exit_status,
    parse_role_pairs,
    render_table,
    write_report,
)

CLIENT, CLIENT_TID = 123, 124
SERVER, SERVER_TID = 200, 201
PATHS = [
    "/api/v1/namespaces/kube-system/pods",
    "/api/v1/namespaces/datadog-agent/configmaps",
    "/api/v1/persistentvolumes/pvc-63958627-daf8-4858-bf79-3818733c87b4",
]


def trace_line(comm: str, tid: int, ts: float, message: str, cpu: int = 0) -> str:
    return f"{comm:>16}-{tid:<6} [{cpu:03d}] ...11 {ts:12.6f}: bpf_trace_printk: {message}"


def builtin(direction: str, pid: int, line: str) -> str:
    return f"usmlab-tls {direction} pid={pid} len=100 line={line}"


class Lab:
    """A run folder being written: requests sent at 100.0 s + 1 s per request."""

    def __init__(self, root: Path, trace_clock: str = "mono", tracer: str = "builtin") -> None:
        self.dir = root / "run"
        self.dir.mkdir()
        self.requests: list[dict[str, Any]] = []
        self.served: list[dict[str, Any]] = []
        self.trace: list[str] = []
        self.threads: list[dict[str, Any]] = []
        self.processes: list[dict[str, Any]] = [
            {"name": "server", "role": "server", "pid": SERVER, "pgid": SERVER, "port": 8443},
            {"name": "client", "role": "client", "pid": CLIENT, "pgid": CLIENT},
        ]
        self.manifest = {
            "run_id": "20261125T160102Z-test-local",
            "scenario": "test",
            "target": "local",
            "tracer": tracer,
            "trace_clock": trace_clock,
            "status": "complete",
        }

    def request(self, seq: int, path: str | None = None, port: int = 8443) -> dict[str, Any]:
        start = 100.0 + seq
        record = {
            "seq": seq,
            "pid": CLIENT,
            "tid": CLIENT_TID,
            "local_addr": "127.0.0.1",
            "local_port": 40000 + seq,
            "remote": f"127.0.0.1:{port}",
            "method": "GET",
            "path": path or PATHS[seq % len(PATHS)],
            "status": 200,
            "error": None,
            "scheduled_mono": start,
            "start_mono": start + 0.0004,
            "end_mono": start + 0.01,
            "conn_id": f"{CLIENT}-{seq}",
        }
        self.requests.append(record)
        return record

    def serve(
        self, req: dict[str, Any], pid: int = SERVER, tid: int = SERVER_TID, port: int = 8443
    ) -> None:
        self.served.append(
            {
                "wall": 1764000000.0,
                "mono": req["start_mono"] + 0.004,
                "pid": pid,
                "tid": tid,
                "method": "GET",
                "path": req["path"],
                "peer_addr": "127.0.0.1",
                "peer_port": req["local_port"],
                "local_port": port,
                "status": 200,
                "conn_id": f"{pid}-1",
            }
        )

    def captured(
        self,
        req: dict[str, Any],
        client: tuple[str, int, int] | None = ("python3", CLIENT_TID, CLIENT),
        server: tuple[str, int, int] | None = ("python3", SERVER_TID, SERVER),
        offset: float = 0.0,
    ) -> None:
        """Built-in tracer lines: request and response, on whichever side is given."""
        t = req["start_mono"] + offset
        request_line = f"GET {req['path']} HTTP/1.1"
        if client:
            comm, tid, pid = client
            self.trace.append(trace_line(comm, tid, t + 0.001, builtin("write", pid, request_line)))
        if server:
            comm, tid, pid = server
            self.trace.append(trace_line(comm, tid, t + 0.002, builtin("read", pid, request_line)))
            self.trace.append(
                trace_line(comm, tid, t + 0.004, builtin("write", pid, "HTTP/1.0 200 OK"))
            )
        if client:
            comm, tid, pid = client
            self.trace.append(
                trace_line(comm, tid, t + 0.008, builtin("read", pid, "HTTP/1.0 200 OK"))
            )

    def write(self) -> Path:
        self.manifest["processes"] = self.processes
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest))
        for name, rows in (
            ("client.jsonl", self.requests),
            ("server.jsonl", self.served),
            ("threads.jsonl", self.threads),
        ):
            (self.dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (self.dir / "trace_pipe.log").write_text("".join(line + "\n" for line in self.trace))
        return self.dir


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def test_all_captured_in_client_means_capture_works(lab: Lab) -> None:
    for seq in range(3):
        req = lab.request(seq)
        lab.serve(req)
        lab.captured(req)
    report = analyze_run(lab.write())
    assert report.outcome == "capture-works"
    assert exit_status(report) == 0
    assert report.requests == {
        "sent": 3,
        "captured_client": 3,
        "captured_server": 3,
        "misattributed": 0,
        "missed": 0,
        "failed": 0,
    }
    assert report.foreign == [] and report.unmatched_captures_count == 0
    assert report.events_by_process[str(CLIENT)]["counts"] == {"tls_read": 3, "tls_write": 3}
    assert report.roles["client"]["pid"] == CLIENT and CLIENT_TID in report.roles["client"]["tids"]


def test_request_captured_only_in_a_third_process_is_misattributed(lab: Lab) -> None:
    ok = lab.request(0)
    lab.captured(ok)
    wrong = lab.request(1)
    lab.captured(wrong, client=("kafka-admin", 7778, 7777), server=None)
    missed = lab.request(2)
    report = analyze_run(lab.write())
    assert report.outcome == "misattribution"
    assert exit_status(report) == 1
    assert report.requests["misattributed"] == 1
    assert report.requests["captured_client"] == 1
    assert report.requests["missed"] == 1
    assert report.missed_requests == [missed["seq"]]
    (entry,) = report.misattributed_requests
    assert (entry["seq"], entry["pid"], entry["tid"], entry["comm"]) == (
        1,
        7777,
        7778,
        "kafka-admin",
    )
    assert entry["path"] == wrong["path"]
    assert [f["pid"] for f in report.foreign] == [7777]


@pytest.mark.parametrize("wrote", [False, True])
def test_a_request_that_never_reached_tls_is_never_misattributed(lab: Lab, wrote: bool) -> None:
    """Its handshake failed (`wrote_request` false): another process's capture of its path in
    its window is that process's traffic. Had it written (true), the capture is its own, taken
    elsewhere: misattributed."""
    ok = lab.request(0)
    lab.captured(ok)
    failed = lab.request(1)
    failed.update(status=None, error="SSLCertVerificationError: certificate verify failed",
                  wrote_request=wrote)  # fmt: skip
    lab.captured(failed, client=("kafka-admin", 7778, 7777), server=None)
    report = analyze_run(lab.write())
    assert report.requests["failed"] == 1 and report.requests["missed"] == 0
    assert report.requests["misattributed"] == (1 if wrote else 0)
    assert [f["pid"] for f in report.foreign] == [7777]  # listed either way
    assert report.outcome == "misattribution"  # a foreign process sent a lab path


def test_foreign_process_sending_lab_paths_is_listed(lab: Lab) -> None:
    req = lab.request(0)
    lab.captured(req)
    other = "/api/v1/namespaces/default/secrets"  # a lab path the client never sent...
    lab.serve({**req, "path": other, "local_port": 45000})  # ...but the lab's server served
    for i in range(2):
        lab.trace.append(
            trace_line("curl", 9001 + i, 103.0 + i, builtin("write", 9000, f"GET {other} HTTP/1.1"))
        )
    report = analyze_run(lab.write())
    assert report.outcome == "misattribution"
    assert exit_status(report) == 1
    assert report.requests["misattributed"] == 0  # the client's own request was fine
    (foreign,) = report.foreign
    assert (foreign["pid"], foreign["tid"], foreign["tids"]) == (9000, 9001, [9001, 9002])
    assert (foreign["comm"], foreign["captures"], foreign["paths"]) == ("curl", 2, [other])
    assert report.unmatched_captures_count == 2
    assert report.unmatched_captures[0]["pid"] == 9000


def test_a_neighbour_labs_traffic_is_not_foreign(lab: Lab) -> None:
    """The built-in tracer sees the whole machine: another lab's client talking to its own
    server (another port, paths this lab never sent nor served) is not this lab's problem."""
    for seq in range(2):
        req = lab.request(seq)
        lab.serve(req)
        lab.captured(req)
    for i, path in enumerate(["/server34519/identify", "/api/v1/namespaces/s1/pods"]):
        lab.trace.append(
            trace_line("python", 9001, 100.2 + i, builtin("write", 9000, f"GET {path} HTTP/1.1"))
        )
    # ...and the same path as this lab's request, at the same time, to its own server.
    same = lab.requests[1]
    lab.trace.append(
        trace_line(
            "python",
            9001,
            same["start_mono"] + 0.002,
            builtin("write", 9000, f"GET {same['path']}"),
        )
    )
    report = analyze_run(lab.write())
    assert report.foreign == []
    assert report.requests["misattributed"] == 0
    assert report.outcome == "capture-works"
    assert report.unmatched_captures_count == 2  # still listed, for the curious


def test_a_foreign_sender_of_a_path_only_the_server_saw_is_foreign(lab: Lab) -> None:
    req = lab.request(0)
    lab.serve(req)
    lab.captured(req)
    secret = "/api/v1/namespaces/default/secrets"
    lab.serve({**req, "path": secret, "local_port": 45000})  # the lab's server served it
    lab.trace.append(
        trace_line("curl", 9001, 100.3, builtin("write", 9000, f"GET {secret} HTTP/1.1"))
    )
    report = analyze_run(lab.write())
    assert [f["pid"] for f in report.foreign] == [9000]
    assert report.server_records_unmatched == 1
    assert report.outcome == "misattribution"


def test_empty_trace_means_no_captures_with_hints(lab: Lab) -> None:
    lab.request(0)
    report = analyze_run(lab.write())
    assert report.outcome == "no-captures"
    assert exit_status(report) == 3
    assert report.requests["missed"] == 1
    assert any("usm-debugger" in h for h in report.hints)
    assert any("trace_pipe" in h for h in report.hints)


def test_failed_requests_hint_at_the_server(lab: Lab) -> None:
    req = lab.request(0)
    req["error"], req["status"] = "ConnectionRefusedError: [Errno 111] refused", None
    report = analyze_run(lab.write())
    assert report.outcome == "no-captures"
    assert report.requests["failed"] == 1
    assert any("grep 8443" in h and f"ps -p {SERVER}" in h for h in report.hints)


def test_trace_without_http_events_hints_at_uprobes(lab: Lab) -> None:
    lab.request(0)
    lab.trace += [trace_line("systemd", 1, 100.5, "some other probe: x=1")] * 3
    lab.trace.append("CPU:0 [LOST 5 EVENTS]")
    report = analyze_run(lab.write())
    assert report.outcome == "no-captures"
    assert any("uprobes" in h for h in report.hints)
    assert any("dropped 5" in h for h in report.hints)
    assert report.lost_events == 5
    assert report.message_counts == {"unknown": 3}


def test_unknown_comm_resolves_through_threads_jsonl(lab: Lab) -> None:
    """`<...>` says nothing; the sampler's threads.jsonl says tid 301 is the sampler's."""
    lab.processes.append({"name": "sampler", "role": "sampler", "pid": 300, "pgid": 300})
    lab.threads.append(
        {
            "mono": 99.0,
            "name": "sampler",
            "role": "sampler",
            "pid": 300,
            "tid": 301,
            "comm": "python3",
        }
    )
    req = lab.request(0)
    lab.trace.append(
        trace_line("<...>", 301, req["start_mono"] + 0.001, f"my probe: GET {req['path']}")
    )
    report = analyze_run(lab.write())
    (entry,) = report.misattributed_requests
    assert (entry["pid"], entry["tid"], entry["comm"]) == (300, 301, "python3")
    assert report.foreign == []  # a lab helper, not a foreign process
    assert report.outcome == "misattribution"


def test_pathless_usm_events_are_attributed_per_process_by_thread(lab: Lab) -> None:
    lab.manifest["tracer"] = "usm-debugger"
    lab.threads += [
        {
            "mono": 99.0,
            "name": "client",
            "role": "client",
            "pid": CLIENT,
            "tid": 125,
            "comm": "worker",
        },
    ]
    for seq in range(2):
        req = lab.request(seq)
        lab.serve(req)
        t = req["start_mono"]
        lab.trace.append(
            trace_line("<...>", CLIENT_TID, t + 0.001, "http_process: type=1 method=1")
        )
        lab.trace.append(
            trace_line(
                "python3", SERVER_TID, t + 0.005, "http2 event enqueued: cpu: 0 batch_idx: 0 len: 1"
            )
        )
    lab.trace.append(
        trace_line("agent", 4444, 100.5, "http2 event enqueued: cpu: 1 batch_idx: 2 len: 1")
    )
    lab.trace.append(trace_line("worker", 125, 100.6, "kprobe/tcp_sendmsg: sk=ffff8881"))
    report = analyze_run(lab.write())
    assert report.outcome == "capture-works"
    assert report.requests["captured_client"] == 2
    assert report.requests["captured_server"] == 2
    events = report.events_by_process
    assert events[str(CLIENT)]["counts"] == {"http_event": 2, "tcp_sendmsg": 1}
    assert events[str(CLIENT)]["other"] is False
    assert events[str(SERVER)]["counts"] == {"http2_event": 2}
    stranger = events["tid:4444"]
    assert (stranger["pid"], stranger["comm"], stranger["other"]) == (None, "agent", True)
    assert report.foreign == []  # pathless events of others are flagged, not judged


def test_pathless_events_in_a_thread_that_logged_no_request_count_for_its_process(
    lab: Lab,
) -> None:
    """A Go client writes from net/http's goroutine threads, not the worker that logged the
    request: USM's events there still count for the client process's request at that time."""
    lab.threads.append(
        {"mono": 99.0, "name": "client", "role": "client", "pid": CLIENT, "tid": 130, "comm": "x"}
    )
    first, second = lab.request(0), lab.request(1)
    lab.trace.append(
        trace_line("x", 130, second["start_mono"] + 0.002, "http_process: type=1 method=1")
    )
    report = analyze_run(lab.write())
    assert report.requests["captured_client"] == 1
    assert report.missed_requests == [first["seq"]]
    assert report.outcome == "capture-works"


def test_offset_is_estimated_when_the_trace_clock_is_not_mono(tmp_path: Path) -> None:
    lab = Lab(tmp_path, trace_clock="local")
    for seq in range(4):
        req = lab.request(seq)
        lab.captured(req, offset=5000.0)  # trace seconds since boot, far from monotonic time
    report = analyze_run(lab.write())
    assert report.clock["source"] == "estimated"
    assert report.clock["offset"] == pytest.approx(5000.0, abs=0.01)
    assert report.outcome == "capture-works"
    assert report.requests["captured_client"] == 4


def test_without_estimation_the_same_trace_matches_nothing(tmp_path: Path) -> None:
    lab = Lab(tmp_path, trace_clock="mono")  # claims mono, but is off by 5000 s
    req = lab.request(0)
    lab.captured(req, offset=5000.0)
    report = analyze_run(lab.write())
    assert report.outcome == "no-captures"
    assert report.unmatched_captures_count == 2
    assert any("clock" in h for h in report.hints)


PS_TEXT = """\
    PID     TID COMMAND
      1       1 systemd
    123     123 tls_client
    123     124 tls_client
    200     200 tls_server
    200     201 tls_server
    500     500 kafka admin
    500     502 kafka admin
"""


def test_analyze_capture_with_ps_output_and_role_pairs(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    for seq in range(2):
        lab.captured(lab.request(seq), client=("<...>", CLIENT_TID, CLIENT))
    wrong = lab.request(2)
    lab.captured(wrong, client=("<...>", 502, 500), server=None)
    run = lab.write()
    ps = tmp_path / "ps.txt"
    ps.write_text(PS_TEXT)
    roles = parse_role_pairs([f"client={CLIENT}", f"server={SERVER}"])
    report = analyze_capture(run / "trace_pipe.log", roles, ps, run / "client.jsonl")
    assert report.requests["captured_client"] == 2
    (entry,) = report.misattributed_requests
    assert (entry["pid"], entry["tid"], entry["comm"]) == (500, 502, "kafka admin")
    assert report.foreign[0]["comm"] == "kafka admin"
    assert report.outcome == "misattribution"
    assert report.roles["client"]["tids"] == [123, 124]


def test_analyze_capture_without_client_log_judges_processes(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text(
        trace_line("tls_client", 124, 5.0, builtin("write", 123, f"GET {PATHS[0]} HTTP/1.1")) + "\n"
    )
    report = analyze_capture(trace, {"client": [123]}, None, None)
    assert report.outcome == "capture-works"
    assert report.requests["sent"] == 0
    assert report.unmatched_captures_count == 1


def test_bad_role_pairs_and_missing_files_fail_in_one_line(tmp_path: Path) -> None:
    for bad in (["client"], ["client=abc"], ["=12"], ["client=0"]):
        with pytest.raises(AnalysisError, match="ROLE=PID"):
            parse_role_pairs(bad)
    with pytest.raises(AnalysisError, match="no such trace file"):
        analyze_capture(tmp_path / "nope", {"client": [1]}, None, None)
    with pytest.raises(AnalysisError, match="no such run folder"):
        analyze_run(tmp_path / "nope")


def test_corrupt_client_log_names_the_line(lab: Lab) -> None:
    lab.request(0)
    run = lab.write()
    with open(run / "client.jsonl", "a") as handle:
        handle.write("{not json\n" + json.dumps(lab.requests[0]) + "\n")
    with pytest.raises(AnalysisError) as caught:
        analyze_run(run)
    assert "client.jsonl: line 2 is not valid JSON" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_truncated_last_lines_are_tolerated(lab: Lab) -> None:
    """A run stopped mid-write leaves half a JSON line at the end: that is not corruption."""
    lab.captured(lab.request(0))
    run = lab.write()
    with open(run / "client.jsonl", "a") as handle:
        handle.write('{"seq": 1, "pa')
    with open(run / "threads.jsonl", "a") as handle:
        handle.write('{"mono": 1, "pid"')
    report = analyze_run(run)
    assert report.requests["sent"] == 1
    assert report.outcome == "capture-works"


def test_log_lines_json_takes_but_strict_parsers_refuse_are_read(lab: Lab) -> None:
    """The workloads write with Python's json: NaN is possible, and a path may carry bytes
    that are not UTF-8; blank lines may separate appends. None of it is corruption."""
    lab.captured(lab.request(0))
    lab.captured(lab.request(1))
    run = lab.write()
    lines = (run / "client.jsonl").read_bytes().splitlines()
    second = json.loads(lines[1])
    second["jitter_ms"] = float("nan")
    odd = json.dumps(second).encode().replace(b'"method"', b'"m\xff": 1, "method"')
    (run / "client.jsonl").write_bytes(lines[0] + b"\n\n" + odd + b"\n")
    report = analyze_run(run)
    assert report.requests["sent"] == 2
    assert report.requests["captured_client"] == 2
    assert gc.isenabled()  # the analysis pauses the collector, and gives it back


def test_unreadable_trace_fails_in_one_line(lab: Lab) -> None:
    lab.request(0)
    run = lab.write()
    (run / "trace_pipe.log").unlink()
    (run / "trace_pipe.log").mkdir()
    with pytest.raises(AnalysisError, match=r"trace_pipe\.log: cannot read"):
        analyze_run(run)


def test_two_server_rule_capture_in_the_other_server(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.processes = [
        {"name": "server-8443", "role": "server", "pid": 200, "pgid": 200, "port": 8443},
        {"name": "server-9443", "role": "server", "pid": 210, "pgid": 210, "port": 9443},
        {"name": "client", "role": "client", "pid": CLIENT, "pgid": CLIENT},
    ]
    right = lab.request(0, "/server8443/identify")
    lab.captured(right, server=("python3", 201, 200))
    wrong = lab.request(1, "/server8443/identify")
    lab.captured(wrong, client=None, server=("python3", 211, 210))
    report = analyze_run(lab.write())
    assert report.outcome == "misattribution"
    (entry,) = report.misattributed_requests
    assert (entry["seq"], entry["pid"], entry["reason"]) == (1, 210, "wrong-server")
    assert report.requests["captured_server"] == 1  # only the right server's capture counts


def test_two_server_rule_from_server_records_and_tuples(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.processes.append({"name": "server-9443", "role": "server", "pid": 210, "pgid": 210})
    served_wrong = lab.request(0, "/server8443/identify")
    lab.serve(served_wrong, pid=210, tid=211, port=9443)
    lab.captured(served_wrong, server=None)
    tuple_wrong = lab.request(1, "/server8443/identify")
    lab.trace.append(
        trace_line(
            "system-probe",
            77,
            tuple_wrong["start_mono"] + 0.001,
            f"http_process: pid={CLIENT} GET /server8443/identify"
            " 127.0.0.1:40001 -> 127.0.0.1:9443",
        )
    )
    report = analyze_run(lab.write())
    reasons = {m["seq"]: (m["pid"], m["reason"]) for m in report.misattributed_requests}
    assert reasons == {0: (210, "wrong-server"), 1: (CLIENT, "wrong-server")}
    assert report.outcome == "misattribution"


def test_untraced_run_is_not_a_failure(tmp_path: Path) -> None:
    lab = Lab(tmp_path, tracer="none")
    lab.request(0)
    report = analyze_run(lab.write())
    assert report.outcome == "untraced"
    assert exit_status(report) == 0


def test_parallel_scan_gives_the_same_report(lab: Lab) -> None:
    for seq in range(40):
        req = lab.request(seq)
        lab.serve(req)
        if seq % 7 == 3:
            lab.captured(req, client=("kafka-admin", 7778, 7777))
        elif seq % 11 != 5:
            lab.captured(req)
        lab.trace.append(trace_line("noise", 42, req["start_mono"] + 0.5, "tick\ncontinued"))
    run = lab.write()
    single = analyze_run(run, workers=1).to_dict()
    for workers in (2, 3):
        assert analyze_run(run, workers=workers).to_dict() == single
    assert single["requests"]["misattributed"] == 6
    assert single["trace"]["continuation_lines"] == 40


def test_reports_are_written_and_summarised(lab: Lab) -> None:
    lab.captured(lab.request(0), client=("kafka-admin", 7778, 7777))
    run = lab.write()
    report = analyze_run(run)
    json_path, md_path = write_report(report, run)
    data = json.loads(json_path.read_text())
    for key in (
        "outcome",
        "requests",
        "foreign",
        "roles",
        "lost_events",
        "unparsed_lines",
        "tracer",
        "trace_clock",
        "trace_lines",
        "message_counts",
        "unmatched_captures",
        "events_by_process",
        "hints",
        "misattributed_requests",
        "missed_requests",
    ):
        assert key in data
    assert data["outcome"] == "misattribution"
    markdown = md_path.read_text()
    assert "**Verdict: misattribution**" in markdown and "kafka-admin" in markdown
    table = render_table(report)
    assert len(table.splitlines()) <= 15
    assert "misattribution" in table and "7777" in table


def tuple_line(direction: str, ts: float, pid: int, tid: int, sport: int, dport: int) -> str:
    loopback = "100007f"  # 127.0.0.1 as the kernel's __be32, printed as a number
    return (
        f"usmlab-tuple {direction} ts={int(ts * 1e9)} pid={pid} tid={tid} fd=5 "
        f"true={loopback}:{sport}-{loopback}:{dport}"
    )


def test_a_capture_on_another_connection_is_a_wrong_tuple(lab: Lab) -> None:
    """Every capture's connection, read from its socket, must be one its process's request was
    using then: a client write on a connection no request explains is misattributed."""
    reqs = [lab.request(seq) for seq in range(3)]
    for req in reqs:
        lab.serve(req)
        lab.captured(req)
    # A fourth connected but failed its handshake: no write, so it is not "without a tuple".
    lab.request(3).update(status=None, error="SSLError: handshake", wrote_request=False)
    lines = [
        tuple_line("write", r["start_mono"] + 0.001, CLIENT, CLIENT_TID, r["local_port"], 8443)
        for r in reqs[:2]
    ]
    # The third write's capture names another connection (a port no request used).
    lines.append(
        tuple_line("write", reqs[2]["start_mono"] + 0.001, CLIENT, CLIENT_TID, 55555, 8443)
    )
    run_dir = lab.write()
    (run_dir / "tracer.log").write_text("USMLAB_TRACER_ATTACHED 1\n" + "\n".join(lines) + "\n")
    report = analyze_run(run_dir)
    assert report.tuples is not None
    assert report.tuples["wrong_tuple"]["count"] == 1
    assert report.tuples["wrong_tuple"]["of"] == 3
    assert report.tuples["not_seen"] == 1 and report.tuples["requests_seen"] == 2
    assert report.tuples["examples"][0]["tuple"] == "127.0.0.1:55555->127.0.0.1:8443"
    assert report.outcome == "misattribution"
    assert exit_status(report) == 1


def test_captures_on_their_own_connections_leave_the_verdict_as_it_was(lab: Lab) -> None:
    reqs = [lab.request(seq) for seq in range(2)]
    for req in reqs:
        lab.serve(req)
        lab.captured(req)
    lines = [
        tuple_line("write", r["start_mono"] + 0.001, CLIENT, CLIENT_TID, r["local_port"], 8443)
        for r in reqs
    ]
    run_dir = lab.write()
    (run_dir / "tracer.log").write_text("\n".join(lines) + "\n")
    report = analyze_run(run_dir)
    assert report.outcome == "capture-works"
    assert report.tuples["wrong_tuple"] == {"count": 0, "of": 2}


def test_a_tuple_the_tracer_could_not_read_is_unreadable_not_wrong(lab: Lab) -> None:
    """All-zero tuples are the tracer's failed pointer reads (seen when a probe read the
    wrong register): they must not turn a clean run into a misattribution."""
    reqs = [lab.request(seq) for seq in range(2)]
    for req in reqs:
        lab.serve(req)
        lab.captured(req)
    zero = "usmlab-tuple write ts={} pid={} tid={} fd=0 true=0:0-0:0"
    lines = [zero.format(int((r["start_mono"] + 0.001) * 1e9), CLIENT, CLIENT_TID) for r in reqs]
    run_dir = lab.write()
    (run_dir / "tracer.log").write_text("\n".join(lines) + "\n")
    report = analyze_run(run_dir)
    assert report.tuples["unreadable"] == 2
    assert report.tuples["wrong_tuple"] == {"count": 0, "of": 2}
    assert report.tuples["not_seen"] == 2
    assert report.outcome == "capture-works"
    assert "UNREADABLE 2" in "\n".join(render_table(report).splitlines())


def test_analyze_json_prints_the_report_with_the_verdicts_exit_status(lab: Lab) -> None:
    """`usmlab analyze RUN --json`: the report for scripts, the exit status unchanged."""
    for req in [lab.request(seq) for seq in range(2)]:
        lab.serve(req)  # served, never captured: missed, and no captures at all
    run_dir = lab.write()
    done = run_usmlab("analyze", str(run_dir), "--json")
    printed = json.loads(done.stdout)
    assert printed == json.loads((run_dir / "report.json").read_text())
    assert printed["requests"]["missed"] == 2
    assert printed["outcome"] == "no-captures"
    assert done.returncode == exit_status(analyze_run(run_dir)) == 3
