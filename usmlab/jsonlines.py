"""The controller's one JSON-lines reader (the target side has its own in kit/labkit.py).

Every JSON-lines input of the controller goes through here: the workloads' logs (one object a
line, written while the run goes on, so a last line may be cut), the kit scripts' answers on
stdout, the system-probe dumps' index. A run that ended early may end with a half-written line:
tolerated. A bad line in the middle is corruption, reported in one line naming file and line.
orjson parses about three times faster than json; what it refuses (NaN, bytes that are not
UTF-8, blank lines) gets json's lenient second look.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from usmlab.errors import InputError


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a file; a truncated last line is skipped.

    InputError for an unreadable file, or a line in the middle that is not a JSON object.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    yield from _objects(data.split(b"\n"), str(path))


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every object of a JSON-lines file ([] for a missing file when `missing_ok`)."""
    if missing_ok and not path.exists():
        return []
    return [item for _, item in iter_jsonl(path)]


def parse_json_lines(text: str | bytes) -> list[dict[str, Any]]:
    """The JSON objects among a command's output lines; other lines (messages) are passed over."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    found = []
    for line in raw.split(b"\n"):
        if line.lstrip().startswith(b"{"):
            item = _loads(line)
            if type(item) is dict:
                found.append(item)
    return found


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            return json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            return None


def _objects(lines: list[bytes], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    loads = orjson.loads
    last = len(lines)
    for number, line in enumerate(lines, 1):
        try:
            item = loads(line)
        except orjson.JSONDecodeError:
            text = line.decode("utf-8", "replace")
            try:
                item = json.loads(text)
            except ValueError:
                if not text.strip() or number == last:  # blank, or the writer stopped mid-line
                    continue
                raise InputError(f"{name}: line {number} is not valid JSON") from None
        if type(item) is not dict:
            raise InputError(f"{name}: line {number} is not a JSON object")
        yield number, item
