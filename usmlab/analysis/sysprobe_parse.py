"""Read system-probe's debug dumps entry by entry, in memory that does not grow with the dump.

A dump of a busy host holds millions of entries (docs/sysprobe.md has the shapes and where they
come from), so nothing here loads a whole document: a small reader walks the JSON text with a
sliding buffer, decodes one array element at a time with json's C scanner, and skips the values
it does not need without building them.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from json.scanner import make_scanner
from pathlib import Path
from typing import Any, TextIO

from usmlab.analysis.errors import AnalysisError

# File names the fetcher writes (usmlab/sysprobe/fetch.py) and this module reads, by endpoint.
HTTP_DUMPS: dict[str, str] = {"http_monitoring": "http", "http2_monitoring": "http2"}
CONNECTIONS_DUMP = "connections"

# USM static tag bits that have kept their meaning in every upstream version of tags-types.h;
# higher bits were renumbered between versions (java, tls.connection, istio, nodejs), so they
# are reported as raw bits rather than guessed.
STABLE_STATIC_TAGS: dict[int, str] = {
    1 << 0: "tls.library:gnutls",
    1 << 1: "tls.library:openssl",
    1 << 2: "tls.library:go",
}

CHUNK_CHARS = 1 << 16
MAX_ELEMENT_CHARS = 16 << 20  # one entry is a few hundred bytes; this means corruption

_scan = make_scanner(json.JSONDecoder())
_WS = " \t\r\n"
_STRUCTURAL = re.compile(r'["\[\]{}]')
_STRING_END = re.compile(r'["\\]')
_NUMBER = frozenset("0123456789.eE+-")


@dataclass(slots=True)
class HttpEntry:
    """One aggregate of USM: requests of one (client, server, path, method), by status code."""

    protocol: str  # "http" or "http2"
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    path: str
    method: str
    by_status: dict[int, int]
    static_tags: int = 0
    tags: tuple[str, ...] = ()
    dns: str = ""
    pid: int | None = None  # only known through /network_tracer/connections

    @property
    def count(self) -> int:
        return sum(self.by_status.values())


@dataclass(frozen=True, slots=True)
class Connection:
    """The parts of one /network_tracer/connections entry that tie a tuple to a process."""

    pid: int
    laddr_ip: str
    laddr_port: int
    raddr_ip: str
    raddr_port: int
    direction: str
    tag_indices: tuple[int, ...] = ()


@dataclass
class PidIndex:
    """Which processes own a (local ip, local port, remote ip, remote port) tuple, and its tags.

    A tuple can belong to several pids over a run (ports are reused), so each maps to a set.
    """

    pids: dict[tuple[str, int, str, int], set[int]] = field(default_factory=dict)
    tags: dict[tuple[str, int, str, int], set[str]] = field(default_factory=dict)
    connections: int = 0  # all entries read
    kept: int = 0  # entries kept by the filter

    def owners(self, local: tuple[str, int], remote: tuple[str, int]) -> set[int]:
        return self.pids.get((*local, *remote), set())

    def tags_of(self, local: tuple[str, int], remote: tuple[str, int]) -> set[str]:
        return self.tags.get((*local, *remote), set())


class _JsonReader:
    """A cursor over JSON text read in chunks; only the unconsumed part stays buffered."""

    def __init__(self, handle: TextIO, name: str) -> None:
        self.handle = handle
        self.name = name
        self.buf = ""
        self.pos = 0
        self.dropped = 0  # characters discarded before buf[0], for error offsets
        self.eof = False

    def fail(self, what: str) -> AnalysisError:
        return AnalysisError(f"{self.name}: {what} at character {self.dropped + self.pos}")

    def _fill(self, want: int = 0) -> bool:
        """Append more text; False at end of file."""
        if self.eof:
            return False
        if self.pos > CHUNK_CHARS:
            self.dropped += self.pos
            self.buf = self.buf[self.pos :]
            self.pos = 0
        data = self.handle.read(max(want, CHUNK_CHARS))  # the module value now: tests shrink it
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def peek(self) -> str:
        """The next non-blank character (not consumed), or '' at end of file."""
        while True:
            buf, pos = self.buf, self.pos
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            self.pos = pos
            if pos < len(buf):
                return buf[pos]
            if not self._fill():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = self.peek() or "end of file"
            raise self.fail(f"malformed JSON: expected {char!r}, found {found!r}")
        self.pos += 1

    def value(self) -> Any:
        """Decode the next value whole (an array element, a key, a small field)."""
        self.peek()
        want = CHUNK_CHARS
        while True:
            try:
                item, end = _scan(self.buf, self.pos)
            except (StopIteration, ValueError):
                item, end = None, -1
            # A value that reaches the end of the buffer may be cut (a number, a literal), and
            # a number followed by `.`/`e`/`-`... may go on: it is only trusted once a
            # character that cannot continue it follows, or the file has ended.
            if end != -1 and (self.eof or (end < len(self.buf) and self.buf[end] not in _NUMBER)):
                self.pos = end
                return item
            if len(self.buf) - self.pos > MAX_ELEMENT_CHARS:
                raise self.fail("malformed JSON or an entry larger than 16 MB")
            if not self._fill(want):
                if end != -1:
                    self.pos = end
                    return item
                raise self.fail("malformed JSON (truncated or invalid value)")
            want *= 2

    def skip(self) -> None:
        """Step over the next value without building it (large maps we do not need)."""
        first = self.peek()
        if first == "":
            raise self.fail("malformed JSON: value expected, found end of file")
        if first not in '[{"':
            self.value()  # a number or literal: small
            return
        depth = 0
        in_string = False
        while True:
            pattern = _STRING_END if in_string else _STRUCTURAL
            match = pattern.search(self.buf, self.pos)
            if match is None or (match.group() == "\\" and match.end() >= len(self.buf)):
                # Nothing of interest in what is buffered (or an escape cut in two): read on.
                self.pos = len(self.buf) if match is None else match.start()
                if not self._fill():
                    raise self.fail("malformed JSON: value not closed before end of file")
                continue
            char = match.group()
            if char == "\\":
                self.pos = match.end() + 1  # the escaped character, whatever it is
                continue
            self.pos = match.end()
            if in_string:
                in_string = False
                if depth == 0:
                    return
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return

    def items(self) -> Iterator[Any]:
        """Elements of the array that starts here, one at a time.

        The inner loop decodes element after element straight from the buffer; only an
        element that may be cut by the buffer's end takes the slow path that reads more.
        """
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        scan = _scan
        while True:
            buf, pos, size = self.buf, self.pos, len(self.buf)
            while True:
                while pos < size and buf[pos] in _WS:
                    pos += 1
                try:
                    item, end = scan(buf, pos)
                except (StopIteration, ValueError):
                    break
                while end < size and buf[end] in _WS:
                    end += 1
                if end >= size:
                    break
                sep = buf[end]
                if sep == ",":
                    self.pos = pos = end + 1
                    yield item
                elif sep == "]":
                    self.pos = end + 1
                    yield item
                    return
                else:
                    break  # a number cut short (`0.`) or damage: the slow path tells which
            self.pos = pos
            yield self.value()  # reads more text as needed
            sep = self.peek()
            if sep == "]":
                self.pos += 1
                return
            if sep != ",":
                raise self.fail("malformed JSON: expected ',' or ']' in an array")
            self.pos += 1

    def members(self) -> Iterator[str]:
        """Keys of the object that starts here; the caller consumes each value before next()."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise self.fail("malformed JSON: object key is not a string")
            self.expect(":")
            yield key
            sep = self.peek()
            self.pos += 1
            if sep == "}":
                return
            if sep != ",":
                self.pos -= 1
                raise self.fail("malformed JSON: expected ',' or '}' in an object")


def _open(path: Path) -> TextIO:
    try:
        return open(path, encoding="utf-8", errors="replace")  # closed by the caller
    except OSError as exc:
        raise AnalysisError(f"{path}: cannot read ({exc.strerror})") from None


def iter_records(path: Path, list_key: str | None = None) -> Iterator[Any]:
    """Elements of a dump whose top level is a list, or an object holding one.

    With an object, the list is `list_key`'s value (or the first list found); other values are
    skipped unread. `{"error": "... monitoring is disabled"}` (system-probe's answer for a
    disabled protocol) raises a one-line AnalysisError with that text.
    """
    with _open(path) as handle:
        reader = _JsonReader(handle, str(path))
        first = reader.peek()
        if first == "[":
            yield from reader.items()
        elif first == "{":
            done = False
            for key in reader.members():
                wanted = not done and (key == list_key or list_key is None)
                if wanted and reader.peek() == "[":
                    yield from reader.items()
                    done = True
                elif key == "error" and reader.peek() == '"':
                    raise AnalysisError(f"{path}: system-probe said: {reader.value()}")
                else:
                    reader.skip()
        elif first == "":
            return  # an empty file: a fetch that got nothing
        else:
            raise reader.fail("malformed JSON: expected a list or an object")
        if reader.peek() != "":
            raise reader.fail("malformed JSON: data after the document")


@lru_cache(maxsize=4096)
def normal_ip(text: str) -> str:
    """One spelling per address ('::ffff:127.0.0.1' and '127.0.0.1' differ; '0:0::1' is '::1')."""
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text


@lru_cache(maxsize=256)
def static_tag_names(bits: int) -> tuple[str, ...]:
    """Names of the stable bits; other set bits as `usm.static_tag_bit:N`."""
    names = [name for bit, name in STABLE_STATIC_TAGS.items() if bits & bit]
    names += [f"usm.static_tag_bit:{n}" for n in range(3, 64) if bits & (1 << n)]
    return tuple(names)


def _field(obj: dict[str, Any], go_name: str, other_name: str) -> Any:
    """Go's field name (what system-probe prints), else a lower-case spelling."""
    value = obj.get(go_name)
    return obj.get(other_name) if value is None else value


def _address(obj: Any) -> tuple[str, int]:
    if not isinstance(obj, dict):
        return "", 0
    ip = _field(obj, "IP", "ip")
    port = _field(obj, "Port", "port")
    try:
        return normal_ip(str(ip or "")), int(port or 0)
    except (TypeError, ValueError):
        return normal_ip(str(ip or "")), 0


def _status_counts(statuses: Any) -> dict[int, int]:
    """ByStatus: {"200": {"Count": n, ...}} -> {200: n}."""
    by_status: dict[int, int] = {}
    if not isinstance(statuses, dict):
        return by_status
    for code, stats in statuses.items():
        count = _field(stats, "Count", "count") if isinstance(stats, dict) else stats
        try:
            by_status[int(code)] = by_status.get(int(code), 0) + int(count or 0)
        except (TypeError, ValueError):
            continue
    return by_status


def http_entry(raw: Any, protocol: str) -> HttpEntry | None:
    """Normalize one RequestSummary (pkg/network/protocols/http/debugging); None if not one."""
    try:
        return _exact_entry(raw, protocol)
    except (KeyError, TypeError, ValueError, AttributeError):
        return _tolerant_entry(raw, protocol)


def _exact_entry(raw: dict[str, Any], protocol: str) -> HttpEntry:
    """The shape system-probe prints, read without detours (dumps hold millions of these)."""
    client = raw["Client"]
    server = raw["Server"]
    static = raw["StaticTags"]
    tags = static_tag_names(static) if static else ()
    dynamic = raw["DynamicTags"]
    if dynamic:
        tags += tuple(map(str, dynamic))
    return HttpEntry(
        protocol,
        normal_ip(client["IP"]),
        int(client["Port"]),
        normal_ip(server["IP"]),
        int(server["Port"]),
        raw["Path"],
        raw["Method"],
        {int(code): stats["Count"] for code, stats in raw["ByStatus"].items()},
        static,
        tags,
        raw.get("DNS") or "",
    )


def _tolerant_entry(raw: Any, protocol: str) -> HttpEntry | None:
    """Any spelling close enough (lower-case keys, missing fields, counts without stats)."""
    if not isinstance(raw, dict):
        return None
    client_ip, client_port = _address(_field(raw, "Client", "client"))
    server_ip, server_port = _address(_field(raw, "Server", "server"))
    static = _field(raw, "StaticTags", "static_tags") or 0
    if not isinstance(static, int):
        static = 0
    tags = static_tag_names(static) if static else ()
    dynamic = _field(raw, "DynamicTags", "dynamic_tags")
    if dynamic and isinstance(dynamic, list):
        tags += tuple(str(t) for t in dynamic)
    return HttpEntry(
        protocol,
        client_ip,
        client_port,
        server_ip,
        server_port,
        str(_field(raw, "Path", "path") or ""),
        str(_field(raw, "Method", "method") or ""),
        _status_counts(_field(raw, "ByStatus", "by_status")),
        static,
        tags,
        str(_field(raw, "DNS", "dns") or ""),
    )


def iter_http_entries(path: Path, protocol: str = "http") -> Iterator[HttpEntry]:
    """Entries of one http_monitoring / http2_monitoring dump (both have the same shape)."""
    for raw in iter_records(path):
        entry = http_entry(raw, protocol)
        if entry is not None:
            yield entry


def connection(raw: Any) -> Connection | None:
    """Normalize one jsonpb-encoded Connection (agent-payload process/connections.proto)."""
    if not isinstance(raw, dict):
        return None
    try:
        pid = int(raw.get("pid") or 0)
    except (TypeError, ValueError):
        return None
    laddr = _address(raw.get("laddr"))
    raddr = _address(raw.get("raddr"))
    tags = raw.get("tags") or []
    indices = tuple(int(t) for t in tags if isinstance(t, int)) if isinstance(tags, list) else ()
    return Connection(
        pid=pid,
        laddr_ip=laddr[0],
        laddr_port=laddr[1],
        raddr_ip=raddr[0],
        raddr_port=raddr[1],
        direction=str(raw.get("direction") or ""),
        tag_indices=indices,
    )


def iter_connections(path: Path) -> Iterator[Connection]:
    """Entries of a /network_tracer/connections dump (its `conns` list), one at a time."""
    for raw in iter_records(path, list_key="conns"):
        conn = connection(raw)
        if conn is not None:
            yield conn


def _tag_table(path: Path) -> list[str]:
    """The dump's top-level `tags` strings, which connections' `tags` indices point into."""
    with _open(path) as handle:
        reader = _JsonReader(handle, str(path))
        if reader.peek() != "{":
            return []
        for key in reader.members():
            if key == "tags" and reader.peek() == "[":
                return [str(t) for t in reader.items()]
            reader.skip()
    return []


def build_pid_index(
    paths: list[Path],
    keep: Callable[[Connection], bool] | None = None,
    errors: list[str] | None = None,
) -> PidIndex:
    """Tuple -> pids over every connections dump of a run.

    `keep` limits the index to the connections that matter (the lab's ports), so its size
    follows the lab, not the host. Tags are resolved per file: each dump has its own table.
    With `errors`, a damaged file is reported there (what was read of it is kept) instead of
    stopping the whole index.
    """
    index = PidIndex()
    for path in paths:
        try:
            _index_file(index, path, keep)
        except AnalysisError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
    return index


def _index_file(index: PidIndex, path: Path, keep: Callable[[Connection], bool] | None) -> None:
    pending: list[Connection] = []  # kept connections with tags, resolved once the table is read
    for conn in iter_connections(path):
        index.connections += 1
        if keep is not None and not keep(conn):
            continue
        index.kept += 1
        key = (conn.laddr_ip, conn.laddr_port, conn.raddr_ip, conn.raddr_port)
        index.pids.setdefault(key, set()).add(conn.pid)
        if conn.tag_indices:
            pending.append(conn)
    if pending:
        table = _tag_table(path)
        for conn in pending:
            key = (conn.laddr_ip, conn.laddr_port, conn.raddr_ip, conn.raddr_port)
            names = {table[i] for i in conn.tag_indices if 0 <= i < len(table)}
            index.tags.setdefault(key, set()).update(names)


_NUMBERED = re.compile(r"^(?P<name>.+)\.(?P<seq>\d+|final)\.json$")


def dump_files(folder: Path, name: str) -> list[Path]:
    """A run's dumps of one endpoint in fetch order: `name.0001.json`..., then `name.final.json`.

    A plain `name.json` (a one-off fetch) counts too, first.
    """
    found: list[tuple[int, Path]] = []
    if not folder.is_dir():
        return []
    for path in folder.iterdir():
        if path.name == f"{name}.json":
            found.append((-1, path))
            continue
        match = _NUMBERED.match(path.name)
        if match and match["name"] == name:
            seq = match["seq"]
            found.append((1 << 62 if seq == "final" else int(seq), path))
    return [path for _, path in sorted(found)]
