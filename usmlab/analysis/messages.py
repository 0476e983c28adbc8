"""What a trace_pipe message says: the built-in tracer's TLS lines, USM's debug printks, or
something else that merely mentions a lab path.

Formats (docs/formats.md, docs/trace_pipe.md): `usmlab-tls write|read pid=N len=N run=TAG line=...`
and the Go probes' `usmlab-tls read-call pid=N len=N run=TAG`;
USM's `http_process: type=%d method=%d`, `http_begin_request: ...`, `<batch> event enqueued: ...`
and friends, which carry no pid and no path; the manual lab README's approximate
`http_process: pid=<PID> GET /path ... 127.0.0.1:<port> -> 127.0.0.1:8443`, which a patched tracer
may print. Classification never fails: what is not recognised is an `unknown` event, counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Kinds in a fixed order: the trace scanner counts per thread by position in this table.
KINDS: tuple[str, ...] = (
    "unknown",
    "tls_write",
    "tls_read",
    "http_event",
    "http2_event",
    "lab_path",
    "go_tls",
    "go_tls_error",
    "batch_flush",
    "enqueue_error",
    "tcp_sendmsg",
    "tls_read_call",
)
KIND_INDEX: dict[str, int] = {kind: i for i, kind in enumerate(KINDS)}
# Kinds that are evidence of HTTP traffic in the thread that printed them.
TRAFFIC_KINDS: frozenset[str] = frozenset(
    {"tls_write", "tls_read", "http_event", "http2_event", "lab_path", "go_tls"}
)
# USM's method enum (datadog-agent pkg/network/protocols/http: MethodUnknown = 0, then these).
USM_METHODS: tuple[str, ...] = (
    "UNKNOWN",
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "HEAD",
    "OPTIONS",
    "PATCH",
)
LAB_PATH_PREFIXES: tuple[str, ...] = ("/api/", "/server")


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A classified message. `keep` asks the scanner for every occurrence (it names a process,
    a path or a connection); `traffic` marks evidence of HTTP traffic by the printing thread.
    Events are immutable: identical messages, and pathless USM messages of one kind, share one."""

    kind: str
    pid: int | None = None
    path: str | None = None
    method: str | None = None
    status: int | None = None
    index: int = 0
    keep: bool = False
    traffic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", KIND_INDEX[self.kind])
        object.__setattr__(self, "traffic", self.kind in TRAFFIC_KINDS)
        object.__setattr__(self, "keep", self.pid is not None or self.path is not None)


@dataclass(frozen=True, slots=True)
class TlsEvent(MessageEvent):
    """The built-in tracer's view of one SSL_write/SSL_read: the first line of the plaintext."""

    direction: str = ""
    length: int = 0
    line: str = ""
    run: str | None = None  # the tag of the run whose tracer printed it


@dataclass(frozen=True, slots=True)
class UsmEvent(MessageEvent):
    """A USM debug printk. `batch` names the batch of batch lines (http, http2,
    terminated_http2); `src`/`dst` are `addr:port` when the message carries a connection tuple
    (the manual lab README's form, docs/background.md). The per-message numbers are in
    `usm_fields(message)`."""

    batch: str | None = None
    src: str | None = None
    dst: str | None = None

    def __post_init__(self) -> None:
        MessageEvent.__post_init__(self)
        if self.dst is not None:
            object.__setattr__(self, "keep", True)

    @property
    def dst_port(self) -> int | None:
        """The destination port of the connection tuple, if the message has one."""
        if self.dst is None:
            return None
        port = self.dst.rpartition(":")[2]
        return int(port) if port.isdigit() else None


# `run=` tags the lines of one run's tracer (older captures have none).
_TLS = re.compile(
    r"usmlab-tls (write|read) pid=(\d+) len=(-?\d+)(?: run=(\w+))? line=(.*)", re.DOTALL
)
# The Go probes' entry into Conn.Read: no plaintext yet, and the time is when the goroutine
# started waiting, so it names a process but is no evidence of a request (docs/formats.md).
_TLS_READ_CALL = re.compile(r"usmlab-tls read-call pid=(\d+) len=(-?\d+)(?: run=(\w+))?")
_REQUEST_LINE = re.compile(r"([A-Z]{3,10}) (\S+)(?: HTTP/\d(?:\.\d)?)?")
_STATUS_LINE = re.compile(r"HTTP/\d(?:\.\d)? (\d{3})(?: .*)?", re.DOTALL)
_LAB_PATH = re.compile(r"(/api/|/server)[^\s\"'<>,;]*")
_README_FORM = re.compile(r"http_process: pid=(\d+) ([A-Z]{3,10}) (\S+)(.*)", re.DOTALL)
_TUPLE = re.compile(r"(\S+:\d+) -> (\S+:\d+)")
_HEX = r"[0-9a-fA-Fx]+"
# First word -> pattern of USM's fixed formats; the named groups are the message's fields.
_USM: dict[str, re.Pattern[str]] = {
    "http_process:": re.compile(r"http_process: type=(?P<type>\d+) method=(?P<method>\d+)"),
    "http_begin_request:": re.compile(
        rf"http_begin_request: htx=(?P<htx>{_HEX}) method=(?P<method>\d+)"
        rf" start=(?P<start>{_HEX})"
    ),
    "http_begin_response:": re.compile(
        rf"http_begin_response: htx=(?P<htx>{_HEX}) status=(?P<status>\d+)"
    ),
    "[go-tls-write]": re.compile(r"\[go-tls-write\] processing (?P<what>.*)", re.DOTALL),
    "[go-tls-write-return]": re.compile(
        r"\[go-tls-write-return\] failed getting conn tup from tls conn for pid (?P<pid>\d+)"
    ),
    "kprobe/tcp_sendmsg:": re.compile(r"kprobe/tcp_sendmsg: sk=(?P<sk>\S+)"),
}
_BATCH_KINDS = {"http": "http_event", "http2": "http2_event", "terminated_http2": "http2_event"}
_BATCH = re.compile(
    r"(?P<batch>http|http2|terminated_http2) (?:"
    r"(?P<enqueued>event enqueued): cpu: (?P<cpu>\d+) batch_idx: (?P<batch_idx>\d+)"
    r" len: (?P<len>\d+)"
    r"|(?P<flushed>batch flushed): cpu: (?P<fcpu>\d+) idx: (?P<idx>\d+)"
    r"|(?P<error>enqueue error): cpu: (?P<ecpu>\d+) batch_idx: (?P<ebatch_idx>\d+)"
    r" dropping event because batch is full\.)"
)
# Printed with %d/%llu; the other fields (htx, start, sk: %llx/%p, what: %s) stay text.
_DECIMAL_FIELDS = frozenset({"type", "method", "status", "cpu", "batch_idx", "len", "idx", "pid"})
_FIELD_NAMES = {"fcpu": "cpu", "ecpu": "cpu", "ebatch_idx": "batch_idx"}


def is_lab_path(path: str) -> bool:
    """Paths the lab's client sends: the Kubernetes-like API and the per-server paths."""
    return path.startswith(LAB_PATH_PREFIXES)


def lab_path_in(text: str) -> str | None:
    """The first lab path token in free text, for formats this module does not know."""
    if "/api/" not in text and "/server" not in text:
        return None
    match = _LAB_PATH.search(text)
    return match[0] if match else None


def _usm_match(message: str) -> re.Match[str] | None:
    """The full match of one of USM's own formats (not the manual lab README's form)."""
    first = message.partition(" ")[0]
    pattern = _BATCH if first in _BATCH_KINDS else _USM.get(first)
    return pattern.match(message) if pattern is not None else None


def usm_fields(message: str) -> dict[str, int | str]:
    """The values a USM printk carries (htx, method name, status, cpu, batch_idx, len, sk,
    ...); {} for anything else. Kept out of the events so that events can be shared."""
    match = _usm_match(message)
    if match is None:
        return {}
    fields: dict[str, int | str] = {}
    for name, value in match.groupdict().items():
        if value is None or name in ("enqueued", "flushed", "error"):
            continue
        name = _FIELD_NAMES.get(name, name)
        fields[name] = int(value) if name in _DECIMAL_FIELDS else value
    code = fields.get("method")
    if isinstance(code, int) and code < len(USM_METHODS):
        fields["method"] = USM_METHODS[code]
    return fields


def _shared_events() -> dict[str, UsmEvent]:
    """USM's fixed-format printks by label (the text before the first `:`): one shared event
    each, since the numbers after the label (addresses, timestamps) make most messages unique
    and matter only on demand (`usm_fields`)."""
    events = {
        "http_begin_request": UsmEvent("http_event"),
        "http_begin_response": UsmEvent("http_event"),
        "kprobe/tcp_sendmsg": UsmEvent("tcp_sendmsg"),
    }
    for batch, kind in _BATCH_KINDS.items():
        events[f"{batch} event enqueued"] = UsmEvent(kind, batch=batch)
        events[f"{batch} batch flushed"] = UsmEvent("batch_flush", batch=batch)
        events[f"{batch} enqueue error"] = UsmEvent("enqueue_error", batch=batch)
    return events


def _tls(match: re.Match[str]) -> TlsEvent:
    direction, pid, length, run, line = match.groups()
    method = path = None
    status = None
    request = _REQUEST_LINE.fullmatch(line)
    if request is not None:
        method, path = request[1], request[2]
    else:
        response = _STATUS_LINE.fullmatch(line)
        if response is not None:
            status = int(response[1])
    return TlsEvent(
        "tls_write" if direction == "write" else "tls_read",
        pid=int(pid),
        path=path,
        method=method,
        status=status,
        direction=direction,
        length=int(length),
        line=line,
        run=run,
    )


_BY_LABEL = _shared_events()
_BY_LABEL_BYTES = {label.encode(): event for label, event in _BY_LABEL.items()}


def shared_event(message: bytes) -> MessageEvent | None:
    """`classify(message)` for USM's fixed-format printks, read from the raw bytes; None for
    anything else. Those printks carry addresses and counters, so nearly every one is unique:
    recognising them by label keeps them out of the scanner's message cache (which they would
    flush) and skips decoding. Same answer as `classify`: a lab path anywhere makes it None."""
    label, colon, _ = message.partition(b":")
    if not colon or b"/api/" in message or b"/server" in message:
        return None
    return _BY_LABEL_BYTES.get(label)


_HTTP_PROCESS = UsmEvent("http_event")
_GO_TLS = UsmEvent("go_tls")


def _usm(message: str) -> MessageEvent | None:
    """USM's formats by their fixed leading words; the manual lab README's form in full."""
    label, colon, _ = message.partition(":")
    if not colon:
        label = ""
    shared = _BY_LABEL.get(label)
    if shared is not None:
        return shared
    if label == "http_process":
        readme = _README_FORM.match(message)
        if readme is None:
            return _HTTP_PROCESS if message.startswith("http_process: type=") else None
        pid, method, path, rest = readme.groups()
        tup = _TUPLE.search(rest)
        return UsmEvent(
            "http_event",
            pid=int(pid),
            path=path,
            method=method,
            src=tup[1] if tup else None,
            dst=tup[2] if tup else None,
        )
    if message.startswith("[go-tls-write] processing "):
        path = lab_path_in(message)
        return UsmEvent("go_tls", path=path) if path else _GO_TLS
    if message.startswith("[go-tls-write-return] "):
        match = _USM["[go-tls-write-return]"].match(message)
        return UsmEvent("go_tls_error", pid=int(match["pid"])) if match else None
    return None


def classify(message: str) -> MessageEvent:
    """The typed event a message stands for; `unknown` (possibly with a lab path) otherwise.
    A message naming a lab path is always path-carrying, whatever its format."""
    event: MessageEvent | None = None
    if message.startswith("usmlab-tls "):
        match = _TLS.fullmatch(message)
        if match is not None:
            event = _tls(match)
        else:
            call = _TLS_READ_CALL.fullmatch(message)
            if call is not None:
                event = TlsEvent(
                    "tls_read_call", pid=int(call[1]), direction="read-call",
                    length=int(call[2]), run=call[3],
                )  # fmt: skip
    else:
        event = _usm(message)
    if event is not None and (event.path is not None or event.pid is not None):
        return event
    path = lab_path_in(message)
    if event is None:
        return MessageEvent("lab_path" if path else "unknown", path=path)
    if path is not None:  # a known format whose text names a lab path anyway
        return type(event)(event.kind, path=path)
    return event
