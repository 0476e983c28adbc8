"""trace_pipe parsing and message classification, on literal lines seen from USM."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usmlab.analysis.messages import (
    KINDS,
    TlsEvent,
    UsmEvent,
    classify,
    shared_event,
    usm_fields,
)
from usmlab.analysis.trace_pipe import (
    LostEvents,
    ParseStats,
    TraceRecord,
    TraceScanner,
    parse_file,
    parse_lines,
)

# Literal lines seen from USM (arm64, kernel 5.15).
REAL_LINES = [
    "tls_client-72249 [000] d...1 257128.137261: bpf_trace_printk: http2 event enqueued: "
    "cpu: 0 batch_idx: 0 len: 1",
    "tls_server-74939   [000] d...1 266993.713134: bpf_trace_printk: http2 event enqueued: "
    "cpu: 0 batch_idx: 0 len: 4",
    "tls_client-91018   [003] d...1 301552.158107: bpf_trace_printk: terminated_http2 event "
    "enqueued: cpu: 3 batch_idx: 0 len: 1",
]


def parse(lines: list[str]) -> tuple[list[TraceRecord | LostEvents], ParseStats]:
    stats = ParseStats()
    return list(parse_lines(lines, stats)), stats


def test_real_usm_lines_parse_into_thread_time_and_message() -> None:
    records, stats = parse(REAL_LINES)
    assert records == [
        TraceRecord(
            "tls_client",
            72249,
            0,
            257128.137261,
            "bpf_trace_printk",
            "http2 event enqueued: cpu: 0 batch_idx: 0 len: 1",
        ),
        TraceRecord(
            "tls_server",
            74939,
            0,
            266993.713134,
            "bpf_trace_printk",
            "http2 event enqueued: cpu: 0 batch_idx: 0 len: 4",
        ),
        TraceRecord(
            "tls_client",
            91018,
            3,
            301552.158107,
            "bpf_trace_printk",
            "terminated_http2 event enqueued: cpu: 3 batch_idx: 0 len: 1",
        ),
    ]
    assert (stats.lines, stats.records, stats.unparsed_lines) == (3, 3, 0)


def test_real_usm_lines_classify_as_http2_events() -> None:
    records, _ = parse(REAL_LINES)
    events = [classify(r.message) for r in records if isinstance(r, TraceRecord)]
    assert [e.kind for e in events] == ["http2_event"] * 3
    assert [getattr(e, "batch", None) for e in events] == ["http2", "http2", "terminated_http2"]
    assert all(e.traffic and not e.keep for e in events)  # pathless: judged by thread
    assert usm_fields(records[2].message) == {  # type: ignore[union-attr]
        "batch": "terminated_http2",
        "cpu": 3,
        "batch_idx": 0,
        "len": 1,
    }


@pytest.mark.parametrize(
    ("line", "comm", "tid"),
    [
        ("           <...>-1234  [001] ...11   256.996080: bpf_trace_printk: x", "<...>", 1234),
        (" my proc-name-9-77 [001] .... 12.500000: bpf_trace_printk: x", "my proc-name-9", 77),
        ("kworker/0:1-41 [000] d.h2. 5.000001: bpf_trace_printk: x", "kworker/0:1", 41),
        ("a-b-c-99 [002] d...1 1.000000: bpf_trace_printk: x", "a-b-c", 99),
        ("-7 [000] .... 1.000000: bpf_trace_printk: x", "", 7),
    ],
)
def test_comm_is_split_on_the_last_dash_before_the_tid(line: str, comm: str, tid: int) -> None:
    (record,), _ = parse([line])
    assert isinstance(record, TraceRecord)
    assert (record.comm, record.tid, record.message) == (comm, tid, "x")


@pytest.mark.parametrize(
    "columns",
    [
        "[002] d...1",
        "[002] ...11",
        "[002] ....",
        "[002] d.h2.",
        "[002]",  # no flags column
        "[002] d..1",  # older kernels
        "(  1977) [002] d...1",  # with the TGID column
        "[002] d..1 dN..",  # an extra irq-info column
    ],
)
def test_every_flags_form_and_the_tgid_column(columns: str) -> None:
    line = f"bash-1977  {columns}  17284.993652: bpf_trace_printk: hello: world"
    (record,), stats = parse([line])
    assert isinstance(record, TraceRecord)
    assert (record.comm, record.tid, record.cpu, record.ts) == ("bash", 1977, 2, 17284.993652)
    assert record.message == "hello: world"
    assert stats.unparsed_lines == 0


def test_tracing_mark_write_keeps_its_event_name() -> None:
    (record,), _ = parse(["usmlab-17 [000] .... 10.000001: tracing_mark_write: run start"])
    assert isinstance(record, TraceRecord)
    assert (record.event, record.message) == ("tracing_mark_write", "run start")


def test_lost_events_are_records_and_counted_per_cpu() -> None:
    records, stats = parse(
        [REAL_LINES[0], "CPU:1 [LOST 42 EVENTS]", REAL_LINES[1], "CPU:1 [LOST 8 EVENTS]"]
    )
    assert records[1] == LostEvents(1, 42)
    assert records[3] == LostEvents(1, 8)
    assert (stats.lost_lines, stats.lost_events, stats.lost_by_cpu) == (2, 50, {1: 50})


def test_continuation_lines_extend_the_previous_message() -> None:
    records, stats = parse(
        [
            "stray text before any header",
            "usmlab-17 [000] .... 10.000001: tracing_mark_write: first line",
            "second line",
            "  third: with: colons",
            "",
            REAL_LINES[0],
        ]
    )
    first = records[0]
    assert isinstance(first, TraceRecord)
    assert first.message == "first line\nsecond line\n  third: with: colons"
    assert len(records) == 2
    assert (stats.unparsed_lines, stats.continuation_lines, stats.empty_lines) == (1, 2, 1)
    assert stats.records == 2


def test_continuation_can_turn_a_counted_message_into_a_capture() -> None:
    """A message that names a lab path only on its second line must still be handed over."""
    scanner = TraceScanner(classify, len(KINDS))
    rows = scanner.scan(
        [
            b"curl-50 [000] .... 1.000001: bpf_trace_printk: request follows",
            b"GET /api/v1/namespaces/kube-system/pods",
        ]
    )
    rows += scanner.finish()
    assert len(rows) == 1
    assert rows[0][3].path == "/api/v1/namespaces/kube-system/pods"
    assert sum(sum(c) for c in scanner.thread_counts().values()) == 0


def test_a_repeated_line_parses_the_same_from_the_cache() -> None:
    line = "  dd-agent-1405 [001] d.h2.  5000.000236: bpf_trace_printk: kprobe/tcp_sendmsg: sk=ff"
    records, stats = parse([line, line, line.replace("5000.000236", "5001.000001")])
    first, second, third = records
    assert first == second
    assert isinstance(third, TraceRecord)
    assert (third.comm, third.tid, third.ts) == ("dd-agent", 1405, 5001.000001)
    assert stats.records == 3


def test_parse_file_reads_binary_garbage_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "trace_pipe.log"
    path.write_bytes(
        REAL_LINES[0].encode() + b"\n\xff\xfe\x00 junk\n" + b"caf\xc3-12 [000] .... 1.5: e: \xe9\n"
    )
    stats = ParseStats()
    records = list(parse_file(path, stats))
    assert stats.lines == 3
    assert stats.continuation_lines == 1
    last = records[-1]
    assert isinstance(last, TraceRecord)
    assert (last.tid, last.message) == (12, "\ufffd")


# -- messages ---------------------------------------------------------------------------------


def test_builtin_request_and_status_lines() -> None:
    write = classify(
        "usmlab-tls write pid=3203 len=148 line=GET /api/v1/namespaces/x/configmaps HTTP/1.1"
    )
    assert isinstance(write, TlsEvent)
    assert (write.kind, write.direction, write.pid, write.length) == (
        "tls_write",
        "write",
        3203,
        148,
    )
    assert (write.method, write.path, write.status) == (
        "GET",
        "/api/v1/namespaces/x/configmaps",
        None,
    )
    assert write.keep and write.traffic
    read = classify("usmlab-tls read pid=3161 len=92 line=HTTP/1.0 200 OK")
    assert isinstance(read, TlsEvent)
    assert (read.kind, read.pid, read.status, read.path) == ("tls_read", 3161, 200, None)
    assert read.line == "HTTP/1.0 200 OK"


def test_go_probe_read_call_names_a_process_but_is_no_capture() -> None:
    (record,), _ = parse(
        [
            "goclient-17235 [000] ...11 1190.371537: bpf_trace_printk: "
            "usmlab-tls read-call pid=17227 len=4096"
        ]
    )
    assert isinstance(record, TraceRecord)
    event = classify(record.message)
    assert isinstance(event, TlsEvent)
    assert (event.kind, event.pid, event.length, event.path) == ("tls_read_call", 17227, 4096, None)
    assert event.keep and not event.traffic


@pytest.mark.parametrize(
    ("message", "kind", "fields"),
    [
        ("http_process: type=1 method=2", "http_event", {"type": 1, "method": "POST"}),
        (
            "http_begin_request: htx=ffff0000c1234000 method=1 start=1a2b3c",
            "http_event",
            {"htx": "ffff0000c1234000", "method": "GET", "start": "1a2b3c"},
        ),
        (
            "http_begin_response: htx=ffff00 status=404",
            "http_event",
            {"htx": "ffff00", "status": 404},
        ),
        (
            "http event enqueued: cpu: 1 batch_idx: 5 len: 2",
            "http_event",
            {"batch": "http", "cpu": 1, "batch_idx": 5, "len": 2},
        ),
        (
            "http2 batch flushed: cpu: 1 idx: 9",
            "batch_flush",
            {"batch": "http2", "cpu": 1, "idx": 9},
        ),
        (
            "terminated_http2 enqueue error: cpu: 0 batch_idx: 7"
            " dropping event because batch is full.",
            "enqueue_error",
            {"batch": "terminated_http2", "cpu": 0, "batch_idx": 7},
        ),
        ("[go-tls-write] processing conn", "go_tls", {"what": "conn"}),
        (
            "[go-tls-write-return] failed getting conn tup from tls conn for pid 4242",
            "go_tls_error",
            {"pid": 4242},
        ),
        ("kprobe/tcp_sendmsg: sk=ffff888812345678", "tcp_sendmsg", {"sk": "ffff888812345678"}),
    ],
)
def test_each_usm_format(message: str, kind: str, fields: dict[str, object]) -> None:
    event = classify(message)
    assert isinstance(event, UsmEvent)
    assert event.kind == kind
    assert usm_fields(message) == fields
    assert event.pid == fields.get("pid")
    assert event.path is None


def test_seed_readme_form_carries_pid_path_and_tuple() -> None:
    event = classify(
        "http_process: pid=4321 GET /api/v1/persistentvolumes/pvc-1 ... "
        "127.0.0.1:40312 -> 127.0.0.1:8443"
    )
    assert isinstance(event, UsmEvent)
    assert (event.kind, event.pid, event.method) == ("http_event", 4321, "GET")
    assert event.path == "/api/v1/persistentvolumes/pvc-1"
    assert (event.src, event.dst, event.dst_port) == ("127.0.0.1:40312", "127.0.0.1:8443", 8443)
    assert event.keep


@pytest.mark.parametrize(
    ("message", "kind", "path"),
    [
        ("my probe saw GET /server8443/identify from 10", "lab_path", "/server8443/identify"),
        (
            'debug: "/api/v1/namespaces/x/configmaps", ok',
            "lab_path",
            "/api/v1/namespaces/x/configmaps",
        ),
        ("[go-tls-write] processing /api/v1/x", "go_tls", "/api/v1/x"),
        ("something else entirely", "unknown", None),
        ("http_begin_request", "unknown", None),
        ("usmlab-tls write pid=oops", "unknown", None),
    ],
)
def test_unknown_formats_are_kept_and_lab_paths_found(
    message: str, kind: str, path: str | None
) -> None:
    event = classify(message)
    assert (event.kind, event.path) == (kind, path)
    assert event.keep == (path is not None)


# -- properties -------------------------------------------------------------------------------

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accounted(stats: ParseStats) -> int:
    return (
        stats.records
        + stats.continuation_lines
        + stats.lost_lines
        + stats.unparsed_lines
        + stats.empty_lines
    )


@_FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_and_every_line_is_accounted(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace"
        path.write_bytes(data)
        stats = ParseStats()
        records = list(parse_file(path, stats))
    expected = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    assert stats.lines == expected
    assert _accounted(stats) == stats.lines
    assert sum(isinstance(r, TraceRecord) for r in records) == stats.records
    assert sum(isinstance(r, LostEvents) for r in records) == stats.lost_lines
    for record in records:
        if isinstance(record, TraceRecord):
            classify(record.message)  # must not raise either


_piece = st.sampled_from(
    [
        REAL_LINES[0],
        "  <...>-12 [001] ...11 7.000001: bpf_trace_printk: usmlab-tls read pid=3 len=9 line=x",
        "CPU:0 [LOST 3 EVENTS]",
        "continued: text",
        "",
        "a b-c-5 [000] .... 1.5: ev: m",
        "x-1 [0] d 2.25: e:",
    ]
)


@_FUZZ
@given(st.lists(st.one_of(_piece, st.text(max_size=40)), max_size=30))
def test_arbitrary_text_lines_never_raise_and_are_accounted(lines: list[str]) -> None:
    stats = ParseStats()
    records = list(parse_lines(lines, stats))
    physical = sum(len(line.removesuffix("\n").split("\n")) for line in lines)
    assert stats.lines == physical
    assert _accounted(stats) == stats.lines
    assert sum(isinstance(r, TraceRecord) for r in records) == stats.records


@_FUZZ
@given(st.lists(st.one_of(_piece, st.text(max_size=40)), max_size=30), st.integers(0, 30))
def test_block_boundaries_do_not_change_the_result(lines: list[str], cut: int) -> None:
    """The scanner holds the last record across blocks: splitting input anywhere is neutral."""
    raw = [line.encode("utf-8", "surrogatepass") for line in "\n".join(lines).split("\n")]

    def run(blocks: list[list[bytes]]) -> tuple[list[tuple[object, ...]], ParseStats]:
        scanner = TraceScanner(lambda text: classify(text), len(KINDS), lambda tid: True)
        rows = []
        for block in blocks:
            rows += scanner.scan(block)
        rows += scanner.finish()
        flat = [
            (None, head, rest) if header is None else (header.tid, header.comm, head, rest)
            for header, head, rest, _ in rows
        ]
        return flat, scanner.stats

    cut = min(cut, len(raw))
    assert run([raw]) == run([raw[:cut], raw[cut:]])


_comm = st.text(alphabet="abcxyz -_/:<>.0123", min_size=0, max_size=15).filter(
    lambda c: c == c.strip() or not c.strip()
)


@_FUZZ
@given(
    _comm,
    st.integers(0, 4_000_000),
    st.integers(0, 255),
    st.sampled_from(["d...1", "...11", "....", "d.h2.", ""]),
    st.integers(0, 10**7),
    st.integers(0, 999_999),
    st.text(alphabet="abc :=/-0123", max_size=30),
)
def test_generated_headers_round_trip(
    comm: str, tid: int, cpu: int, flags: str, secs: int, micros: int, message: str
) -> None:
    line = f"{comm}-{tid} [{cpu:03d}] {flags} {secs}.{micros:06d}: bpf_trace_printk: {message}"
    records, stats = parse([line, line])  # the second one comes from the fast path's cache
    assert stats.records == 2
    for record in records:
        assert isinstance(record, TraceRecord)
        assert (record.tid, record.cpu, record.message) == (tid, cpu, message)
        assert record.ts == float(f"{secs}.{micros:06d}")
        assert record.comm == comm.strip()


_USM_LABELS = [
    "http_begin_request", "http_begin_response", "kprobe/tcp_sendmsg", "http event enqueued",
    "http2 batch flushed", "terminated_http2 enqueue error", "http_process", "http2 event",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_USM_LABELS),
    st.sampled_from([":", ": ", " ", ""]),
    st.text(max_size=60) | st.sampled_from([" /api/v1/pods", " sk=/server8443/x", " cpu: 0"]),
)
def test_usm_printks_read_from_bytes_get_the_same_class_as_from_text(
    label: str, sep: str, tail: str
) -> None:
    """The scanner recognises USM's fixed formats from raw bytes, outside its cache: that
    shortcut must never disagree with the full classifier (a lab path anywhere wins)."""
    message = label + sep + tail
    shortcut = shared_event(message.encode())
    if shortcut is not None:
        assert shortcut == classify(message)
    if "/api/" in message or "/server" in message:
        assert shortcut is None and classify(message).path is not None


def _scan_seconds(continuation_bytes: int) -> float:
    import time

    line = b"x" * 63
    lines = [b"usmlab-17 [000] .... 10.000001: bpf_trace_printk: GET /api/v1/x HTTP/1.1"]
    lines += [line] * (continuation_bytes // 64)
    best = float("inf")
    for _ in range(3):
        scanner = TraceScanner(classify, len(KINDS))
        t0 = time.perf_counter()
        scanner.scan(lines)
        scanner.finish()
        best = min(best, time.perf_counter() - t0)
    assert scanner.stats.continuation_lines == len(lines) - 1
    return best


def test_a_huge_run_of_continuation_lines_is_parsed_in_linear_time() -> None:
    """A header followed by megabytes of non-header lines (garbage, or a reader gone wrong):
    the time grows with the bytes, not with their square (8x the bytes: well under 16x)."""
    small, large = _scan_seconds(512 * 1024), _scan_seconds(4 * 1024 * 1024)
    assert large / small < 16, f"0.5 MB: {small:.3f} s, 4 MB: {large:.3f} s"
