"""Streaming parser for the text of /sys/kernel/tracing/trace_pipe (docs/trace_pipe.md).

A line is `<comm>-<TID> [<cpu>] <flags> <seconds.micro>: <event>: <message>`; a physical line that
is not a header continues the previous record's message, `CPU:N [LOST M EVENTS]` reports data the
kernel dropped. Captures run for hours and reach millions of lines, so the parser streams: memory
is constant (bounded caches plus the one pending record), it works on bytes and decodes a message
only the first time it sees it, and it never raises on arbitrary input.

Speed comes from repetition: a thread's header prefix (`python3-3203 [001] ...11 256`, up to the
integer seconds) and most messages recur, so each is validated by a regular expression once and
then recognised by a dictionary lookup. `TraceScanner` is the engine: it hands over the records
its consumer wants (`MessageClass.keep`, or `.traffic` on a watched thread) and only counts the
others per thread. `parse_lines`/`parse_file` use the same engine and yield every record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

# comm (lazy, so the split is on the last dash before `TID [cpu]`), TID, an optional TGID column
# `(  123)`, [cpu], zero to two flag columns (`d...1`, `...11`, `d.h2.`; never starting with a
# digit), timestamp (integer part, optional fraction), event name, message.
_HEADER = re.compile(
    rb"[ \t]*(.*?)-(\d+)[ \t]+(?:\([ \t]*[\d-]+\)[ \t]+)?\[(\d+)\][ \t]+"
    rb"(?:[^\s\d]\S*[ \t]+){0,2}(\d+)(?:\.(\d+))?: (\w+):(?: (.*))?",
    re.DOTALL,
)
_LOST = re.compile(rb"[ \t]*CPU:(\d+) \[LOST (\d+) EVENTS\][ \t\r]*")
_SEP = b": "
_DOT = b"."
_BLOCK_BYTES = 1 << 20
# Bounds that keep memory constant on endless traces; a cleared cache only costs re-validation.
_MAX_PREFIXES = 8192
_MAX_MESSAGES = 16384


class MessageClass(Protocol):
    """What the scanner needs to know about a message: hand it over, or only count it."""

    @property
    def index(self) -> int: ...  # position in the consumer's kind table, for per-thread counts

    @property
    def keep(self) -> bool: ...  # hand over every occurrence (it carries a path, pid, tuple)

    @property
    def traffic(self) -> bool: ...  # hand over when the thread is watched (pathless HTTP event)


@dataclass(slots=True)
class TraceRecord:
    """One trace_pipe record; `tid` is the thread id from the header, not the process id."""

    comm: str
    tid: int
    cpu: int
    ts: float
    event: str
    message: str


@dataclass(slots=True)
class LostEvents:
    """`CPU:N [LOST M EVENTS]`: the kernel dropped M records of CPU N (a reader was too slow)."""

    cpu: int
    count: int


@dataclass(slots=True)
class ParseStats:
    """Every physical line lands in exactly one bucket: records + continuation + lost + unparsed
    + empty == lines."""

    lines: int = 0
    records: int = 0
    continuation_lines: int = 0
    lost_lines: int = 0
    lost_events: int = 0
    unparsed_lines: int = 0
    empty_lines: int = 0
    lost_by_cpu: dict[int, int] = field(default_factory=dict)

    def merge(self, other: ParseStats) -> None:
        """Add the counts of a scan of another part of the same file."""
        self.lines += other.lines
        self.records += other.records
        self.continuation_lines += other.continuation_lines
        self.lost_lines += other.lost_lines
        self.lost_events += other.lost_events
        self.unparsed_lines += other.unparsed_lines
        self.empty_lines += other.empty_lines
        for cpu, count in other.lost_by_cpu.items():
            self.lost_by_cpu[cpu] = self.lost_by_cpu.get(cpu, 0) + count


class ThreadHeader:
    """A validated header prefix: who wrote the line. `counts` is shared by all prefixes of the
    same (tid, comm), so per-thread counts survive cache clears."""

    __slots__ = ("comm", "counts", "cpu", "tid", "ts_offset", "watch")

    def __init__(
        self, comm: str, tid: int, cpu: int, ts_offset: int, counts: list[int], watch: bool
    ) -> None:
        self.comm = comm
        self.tid = tid
        self.cpu = cpu
        self.ts_offset = ts_offset  # where the timestamp starts in the line's head
        self.counts = counts
        self.watch = watch


# A handed-over record: (header, head, rest, message class). `head` is the line up to the `: `
# after the timestamp (`row_ts` reads the time from it), `rest` the event name and message
# (`split_rest` separates them). A lost record is (None, cpu, count, None).
Row = tuple[Any, Any, Any, Any]


def row_ts(header: ThreadHeader, head: bytes) -> float:
    """The record's timestamp in seconds (validated digits, so this cannot fail)."""
    return float(head[header.ts_offset :])


def split_rest(rest: bytes) -> tuple[str, bytes]:
    """(event name, message) from `<event>: <message>`."""
    event, _, message = rest.partition(b":")
    return event.decode("ascii", "replace"), message[1:] if message[:1] == b" " else message


def decode(raw: bytes) -> str:
    """Trace text is mostly ASCII but may hold anything a program printed."""
    return raw.decode("utf-8", "replace")


def _message_text(rest: bytes) -> str:
    """The message of `<event>: <message>` as text, without a CRLF file's carriage return."""
    text = decode(split_rest(rest)[1])
    return text[:-1] if text.endswith("\r") else text


# A message grows by its continuation lines up to this many bytes; further lines are counted
# but not appended. bpf_trace_printk writes at most 1 KiB a call and trace_marker a page, so only
# garbage gets there, and the cap keeps a huge run of non-header lines linear, not quadratic.
MESSAGE_MAX = 16384


class TraceScanner:
    """Incremental trace_pipe scanner over bytes lines without their line feeds.

    `classify(message_text)` is called once per distinct message; `kinds` sizes the per-thread
    counters; `watch(tid)` says whether pathless traffic of that thread is handed over.
    `shared(message_bytes)`, when given, answers first for messages that are unique but of a
    known class (it must agree with `classify`); its answers are not cached.
    """

    def __init__(
        self,
        classify: Callable[[str], MessageClass],
        kinds: int,
        watch: Callable[[int], bool] | None = None,
        shared: Callable[[bytes], MessageClass | None] | None = None,
    ) -> None:
        self.stats = ParseStats()
        self._classify = classify
        self._shared = shared
        self._kinds = kinds
        self._watch = watch or (lambda tid: False)
        # key (line up to the timestamp's dot) -> header; base (key without the seconds) ->
        # header; validated event names; rest (`<event>: <message>`) -> message class.
        self._headers: dict[bytes, ThreadHeader] = {}
        self._bases: dict[bytes, ThreadHeader] = {}
        self._events: dict[bytes, str] = {}
        self._classes: dict[bytes, MessageClass] = {}
        self._counts: dict[tuple[int, str], list[int]] = {}
        self._prev: bytes | None = None  # the last header line, for continuation lines
        self._prev_kept = False  # whether that record was handed over (then it is held)
        self._held: Row | None = None
        self._pending: tuple[bytes, ThreadHeader, bytes, bytes, MessageClass] | None = None
        self._full: bytes | None = None  # the header line whose message reached MESSAGE_MAX

    def thread_counts(self) -> dict[tuple[int, str], list[int]]:
        """Per (tid, comm): how many records of each kind were counted, not handed over."""
        return self._counts

    def scan(self, lines: list[bytes]) -> list[Row]:
        """Scan consecutive physical lines; return the records completed so far, in order.

        The last record is held back until the next header, since a continuation line may
        still extend its message.
        """
        rows: list[Row] = []
        if self._held is not None:
            rows.append(self._held)
            self._held = None
        append = rows.append
        header_of = self._headers.get
        class_of = self._classes.get
        slow = self._slow
        learn_class = self._learn_class
        next_second = self._next_second
        sep = _SEP
        dot = _DOT
        prev = self._prev
        kept = self._prev_kept
        slow_lines = 0
        for line in lines:
            head, _, rest = line.partition(sep)
            key, _, frac = head.rpartition(dot)
            header = header_of(key)
            klass = class_of(rest)
            if header is None and frac.isdigit():
                # A known thread in a new second (the key holds the integer seconds).
                header = next_second(key)
            if klass is None and header is not None and frac.isdigit():
                # The common miss, kept out of the slow path: a known thread prints a message
                # not seen yet (USM's printks carry addresses, so many messages are unique).
                klass = learn_class(rest)
            if header is None or klass is None or not frac.isdigit():
                prev, kept = slow(line, rows, prev, kept)
                slow_lines += 1
            elif klass.keep or (klass.traffic and header.watch):
                append((header, head, rest, klass))
                prev = line
                kept = True
            else:
                header.counts[klass.index] += 1
                prev = line
                kept = False
        self.stats.lines += len(lines)
        self.stats.records += len(lines) - slow_lines  # the slow path counts its own records
        self._prev = prev
        self._prev_kept = kept
        if kept:
            self._held = rows.pop()
        return rows

    def finish(self) -> list[Row]:
        """End of input: release the held record."""
        rows = [] if self._held is None else [self._held]
        self._held = None
        self._prev = None
        self._prev_kept = False
        return rows

    def _class_for(self, rest: bytes, remember: bool) -> MessageClass:
        """Classify `<event>: <message>`; `remember` single validated lines for the fast path."""
        klass = self._classes.get(rest)
        if klass is not None:
            return klass
        if remember:
            return self._new_class(rest)
        return self._classify(_message_text(rest))

    def _learn_class(self, rest: bytes) -> MessageClass | None:
        """`_new_class` for `<event>: <message>` whose event name the full expression already
        validated; None for anything else (the slow path then decides)."""
        event, sep, message = rest.partition(_SEP)
        if not sep or event not in self._events:
            return None
        return self._new_class(rest, message)

    def _new_class(self, rest: bytes, message: bytes | None = None) -> MessageClass:
        """Classify and remember a single-line `<event>: <message>` (validated)."""
        klass = None
        if self._shared is not None:
            klass = self._shared(rest.partition(_SEP)[2] if message is None else message)
        if klass is None:
            klass = self._classify(_message_text(rest))
        if len(self._classes) >= _MAX_MESSAGES:
            self._classes.clear()
        self._classes[rest] = klass
        return klass

    def _header_for(self, match: re.Match[bytes]) -> ThreadHeader:
        comm = decode(match[1])
        tid = int(match[2])
        counts = self._counts.get((tid, comm))
        if counts is None:
            counts = self._counts[(tid, comm)] = [0] * self._kinds
        return ThreadHeader(comm, tid, int(match[3]), match.start(4), counts, self._watch(tid))

    def _learn(self, table: dict[bytes, Any], key: bytes, value: Any) -> None:
        if len(table) >= _MAX_PREFIXES:
            table.clear()
        table[key] = value

    def _next_second(self, key: bytes) -> ThreadHeader | None:
        """The header for `key` when it is a known prefix (`_bases`) in another second; it is
        learned, so the rest of that second takes the fast path."""
        base, _, secs = key.rpartition(b" ")
        known = self._bases.get(base)
        if known is None or not secs.isdigit():
            return None
        header = ThreadHeader(
            known.comm, known.tid, known.cpu, len(base) + 1, known.counts, known.watch
        )
        self._learn(self._headers, key, header)
        return header

    def _parse_header(self, line: bytes) -> tuple[ThreadHeader, bytes, bytes, bool] | None:
        """(header, head, rest, fast) for a header line, None for anything else; `fast` says
        the fast path can take lines of this shape (then its caches are taught).

        The fast path's key holds the integer seconds, so each thread misses once a second;
        `_bases` (the key without the seconds) makes those misses cheap.
        """
        head, sep, rest = line.partition(_SEP)
        key, dot, frac = head.rpartition(_DOT)
        if sep and dot and frac.isdigit():
            header = self._headers.get(key) or self._next_second(key)
            if header is not None:
                event, esep, _ = rest.partition(_SEP)
                if esep and event in self._events:
                    return header, head, rest, True
        match = _HEADER.fullmatch(line)
        if match is None:
            return None
        header = self._header_for(match)
        ts_end = match.end(5) if match[5] is not None else match.end(4)
        head, rest = line[:ts_end], line[match.start(6) :]
        fast = False
        if match[5] is not None and match[7] is not None:
            # The fast path splits on the first `: ` and the last dot before it: teach it this
            # shape only when that split lands exactly where the expression did.
            key = line[: match.end(4)]
            base = key.rpartition(b" ")[0]
            fast = (
                line.partition(_SEP)[0] == head
                and head.rpartition(_DOT)[0] == key
                and len(base) + 1 == match.start(4)
            )
            if fast:
                self._learn(self._headers, key, header)
                self._learn(self._bases, base, header)
                self._learn(self._events, match[6], decode(match[6]))
        return header, head, rest, fast

    def _slow(
        self, line: bytes, rows: list[Row], prev: bytes | None, kept: bool
    ) -> tuple[bytes | None, bool]:
        """Lines the fast path cannot take: new prefixes or messages, LOST, continuations."""
        stats = self.stats
        parsed = self._parse_header(line)
        if parsed is not None:
            stats.records += 1
            header, head, rest, fast = parsed
            klass = self._class_for(rest, remember=fast)
            return line, self._place(rows, header, head, rest, klass)
        if not line or line == b"\r":
            stats.empty_lines += 1
            return prev, kept
        lost = _LOST.fullmatch(line)
        if lost is not None:
            cpu, count = int(lost[1]), int(lost[2])
            stats.lost_lines += 1
            stats.lost_events += count
            stats.lost_by_cpu[cpu] = stats.lost_by_cpu.get(cpu, 0) + count
            rows.append((None, cpu, count, None))
            return None, False  # dropped records end the one before: nothing to continue
        if prev is None:
            stats.unparsed_lines += 1
            return prev, kept
        stats.continuation_lines += 1
        if prev is self._full:  # counted, not appended: no real message is that long
            return prev, kept
        return prev, self._continue(line, rows, prev, kept)

    def _continue(self, line: bytes, rows: list[Row], prev: bytes, kept: bool) -> bool:
        """Append a continuation line to the previous record and re-decide what it is;
        True when the record is now handed over."""
        pending = self._pending
        if kept:
            header, head, rest, klass = rows.pop()
        elif pending is not None and pending[0] is prev:
            _, header, head, rest, klass = pending
            header.counts[klass.index] -= 1
        else:
            parsed = self._parse_header(prev)
            if parsed is None:  # cannot happen: prev was accepted as a header
                return kept
            header, head, rest, fast = parsed
            klass = self._class_for(rest, remember=fast)
            header.counts[klass.index] -= 1
        rest = rest + b"\n" + line
        if len(rest) >= MESSAGE_MAX:
            self._full = prev
        klass = self._class_for(rest, remember=False)
        self._pending = (prev, header, head, rest, klass)
        return self._place(rows, header, head, rest, klass)

    def _place(
        self, rows: list[Row], header: ThreadHeader, head: bytes, rest: bytes, klass: MessageClass
    ) -> bool:
        """Hand the record over or count it; True when handed over."""
        if klass.keep or (klass.traffic and header.watch):
            rows.append((header, head, rest, klass))
            return True
        header.counts[klass.index] += 1
        return False


@dataclass(frozen=True, slots=True)
class _KeepAll:
    index: int = 0
    keep: bool = True
    traffic: bool = True


_KEEP_ALL = _KeepAll()


def _records(rows: list[Row]) -> Iterator[TraceRecord | LostEvents]:
    for header, head, rest, _ in rows:
        if header is None:
            yield LostEvents(head, rest)
        else:
            event, message = split_rest(rest)
            yield TraceRecord(
                header.comm, header.tid, header.cpu, row_ts(header, head), event, decode(message)
            )


def _keep_all(message: str) -> MessageClass:
    return _KEEP_ALL


def _physical_lines(lines: Iterable[str]) -> Iterator[bytes]:
    """Text lines as the bytes they were read from; a trailing line feed is not part of it."""
    for text in lines:
        raw = text.encode("utf-8", "surrogatepass")
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if b"\n" in raw:
            yield from raw.split(b"\n")
        else:
            yield raw


def parse_lines(
    lines: Iterable[str], stats: ParseStats | None = None
) -> Iterator[TraceRecord | LostEvents]:
    """Every record of trace_pipe text lines, in order, in constant memory.

    Pass a ParseStats to get the line accounting (filled in as the generator advances,
    complete when it is exhausted).
    """
    scanner = TraceScanner(_keep_all, 1)
    if stats is not None:
        scanner.stats = stats
    batch: list[bytes] = []
    for raw in _physical_lines(lines):
        batch.append(raw)
        if len(batch) >= 1024:
            yield from _records(scanner.scan(batch))
            batch = []
    yield from _records(scanner.scan(batch))
    yield from _records(scanner.finish())


def read_blocks(source: IO[bytes], start: int = 0, end: int | None = None) -> Iterator[list[bytes]]:
    """Lists of physical lines (no line feeds) from byte `start` up to byte `end`.

    `start` and `end` must be line starts (see `line_start_after`); big reads, one split per
    block, and no copy of a block: the line cut by a block's end is carried to the next one.
    """
    source.seek(start)
    remaining = end - start if end is not None else -1
    rest = b""
    while remaining != 0:
        size = _BLOCK_BYTES if remaining < 0 else min(_BLOCK_BYTES, remaining)
        chunk = source.read(size)
        if not chunk:
            break
        if remaining > 0:
            remaining -= len(chunk)
        lines = chunk.split(b"\n")
        if len(lines) == 1:  # no line feed in this block
            rest += chunk
            if len(rest) >= _BLOCK_BYTES:  # no line is that long: bound memory on garbage
                yield [rest]
                rest = b""
            continue
        if rest:
            lines[0] = rest + lines[0]
        rest = lines.pop()
        yield lines
    if rest:
        yield [rest]


def line_start_after(source: IO[bytes], offset: int) -> int | None:
    """The first line start at or after `offset` that begins a record (a header or a LOST
    line), so a split there cuts no message in two; None when the rest has none nearby."""
    if offset <= 0:
        return 0
    source.seek(offset - 1)
    data = source.read(_BLOCK_BYTES)
    pos = data.find(b"\n")
    while pos >= 0:
        nxt = data.find(b"\n", pos + 1)
        if nxt < 0:
            return None
        line = data[pos + 1 : nxt]
        if _HEADER.fullmatch(line) or _LOST.fullmatch(line):
            return offset + pos
        pos = nxt
    return None


def parse_file(
    path: Path | str, stats: ParseStats | None = None
) -> Iterator[TraceRecord | LostEvents]:
    """Every record of a saved trace_pipe capture; arbitrary bytes are decoded leniently."""
    scanner = TraceScanner(_keep_all, 1)
    if stats is not None:
        scanner.stats = stats
    with open(path, "rb", buffering=0) as source:
        for lines in read_blocks(source):
            yield from _records(scanner.scan(lines))
    yield from _records(scanner.finish())
