"""The system-probe stats source: fetch over a unix socket, stream-parse, judge.

System-probe itself is not on this machine: `sysprobe_double.py` is a TEST DOUBLE serving its
debug endpoints' JSON shapes. Everything else is real: the kit script runs as a process and
talks HTTP/1.1 over the socket, the parser reads the files it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sysprobe_double import (
    KIT_FETCH,
    STATIC_TAG_GO,
    SysprobeDouble,
    connection,
    request_summary,
    two_server_sample,
    write_sample,
)

from usmlab.analysis import sysprobe_parse as parse
from usmlab.analysis.errors import AnalysisError
from usmlab.analysis.sysprobe_parse import iter_http_entries, iter_records
from usmlab.analysis.sysprobe_verdict import judge_dumps, summarize_run
from usmlab.errors import UsmlabError
from usmlab.kit import KIT_DIR
from usmlab.run.sysprobe_fetch import endpoint_urls, fetch_final, start_periodic, stop_periodic
from usmlab.targets.local import LocalTarget

SAMPLE = Path(__file__).parent / "data" / "sysprobe_double_http_monitoring.json"
HTTP = "/network_tracer/debug/http_monitoring"
HTTP2 = "/network_tracer/debug/http2_monitoring"
CONNS = "/network_tracer/connections"
LO = "127.0.0.1"
CLIENT_PID, SERVER_8443_PID, SERVER_9443_PID, STRANGER_PID = 5001, 6001, 6002, 7777


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: unix socket paths are limited to 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="usmsp-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def double(short_dir: Path) -> Iterator[SysprobeDouble]:
    with SysprobeDouble(short_dir) as running:
        yield running


def run_fetch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(KIT_FETCH), *args], capture_output=True, text=True, timeout=timeout
    )


def lab_connections(stranger: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Both ends of every sample connection, owned by the lab processes (or one stranger)."""
    server_pid = {8443: SERVER_8443_PID, 9443: SERVER_9443_PID}
    conns = []
    for client_port, server_port in ((40100, 8443), (40102, 9443), (40104, 9443), (40106, 8443)):
        owner = STRANGER_PID if stranger and client_port == 40106 else CLIENT_PID
        client, server = (LO, client_port), (LO, server_port)
        conns.append(connection(owner, client, server, "outgoing", tags=[0]))
        conns.append(connection(server_pid[server_port], server, client, "incoming"))
    return conns, ["tls.library:go"]


def fetch_all(double: SysprobeDouble, folder: Path) -> subprocess.CompletedProcess[str]:
    folder.mkdir(parents=True, exist_ok=True)
    args = ["--socket", str(double.socket_path)]
    for path, name in (
        (HTTP, "http_monitoring"),
        (HTTP2, "http2_monitoring"),
        (CONNS, "connections"),
    ):
        args += ["--path", f"{path}?client_id=test-{name}", "--out", str(folder / f"{name}.json")]
    return run_fetch(*args)


# -- the kit script: HTTP over the unix socket -------------------------------------------------


def test_fetch_saves_bodies_sent_with_content_length_and_chunked(
    double: SysprobeDouble, tmp_path: Path
) -> None:
    two_server_sample(double)
    out = tmp_path / "http.json"
    done = run_fetch("--socket", str(double.socket_path), "--path", HTTP, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert double.encodings == ["content-length"]
    announced = json.loads(done.stdout)
    assert announced["status"] == 200 and announced["bytes"] == out.stat().st_size
    assert [e.path for e in iter_http_entries(out)][2] == "/server8443/identify"

    conns, tags = lab_connections(stranger=False)
    double.set_connections(conns, tags)
    double.chunk_size = 7  # chunk boundaries fall everywhere, even inside the CRLFs' neighbours
    out = tmp_path / "conns.json"
    done = run_fetch("--socket", str(double.socket_path), "--path", CONNS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert double.encodings[-1] == "chunked"
    assert out.read_bytes() == b"".join(double._connections_doc())


def _python38() -> str | None:
    """A working Python 3.8, the oldest the kit supports (a pyenv shim may not work)."""
    candidates = [
        shutil.which("python3.8"),
        *map(str, Path.home().glob(".pyenv/versions/3.8*/bin/python3.8")),
    ]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 8)":
            return candidate
    return None


def test_kit_script_runs_on_python_3_8(double: SysprobeDouble, tmp_path: Path) -> None:
    python38 = _python38()
    if python38 is None:
        pytest.skip("no Python 3.8 on this machine")
    two_server_sample(double)
    double.chunk_size = 5
    out = tmp_path / "http.json"
    done = subprocess.run(
        [python38, str(KIT_FETCH), "--socket", str(double.socket_path), "--path", HTTP,
         "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert double.encodings == ["chunked"]
    assert sum(e.count for e in iter_http_entries(out)) == 90


def test_missing_socket_is_one_line_and_exit_3(short_dir: Path) -> None:
    missing = short_dir / "nope" / "sysprobe.sock"
    done = run_fetch("--socket", str(missing), "--path", HTTP, "--out", str(short_dir / "x.json"))
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        f"error: system-probe socket not found at {missing} (is system-probe running?)"
    ]
    assert not list(short_dir.glob("x.json*"))


def test_disabled_protocol_fails_alone_in_one_line(double: SysprobeDouble, short_dir: Path) -> None:
    double.http2_enabled = False
    two_server_sample(double)
    folder = short_dir / "out"
    done = fetch_all(double, folder)
    assert done.returncode == 6
    assert done.stderr.strip().splitlines() == [
        f"error: system-probe answered 404 Not Found for {HTTP2}?client_id=test-http2_monitoring"
        ": http2 monitoring is disabled"
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["connections.json", "http_monitoring.json"]


def _read_stdout_lines(proc: subprocess.Popen[str], until: Any, timeout: float) -> list[dict]:
    """JSON lines of a running fetcher until `until(lines)` holds."""
    assert proc.stdout is not None
    lines: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(lines):
        assert time.monotonic() < deadline, f"fetcher said only {lines}"
        line = proc.stdout.readline()
        assert line, f"fetcher ended early: {proc.stderr.read() if proc.stderr else ''}"
        lines.append(json.loads(line))
    return lines


def _periodic(double: SysprobeDouble, folder: Path, every: float) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(KIT_FETCH), "--socket", str(double.socket_path)]
    for path, name in ((HTTP, "http_monitoring"), (CONNS, "connections")):
        args += ["--path", f"{path}?client_id=t-{name}", "--out", str(folder / f"{name}.json")]
    args += ["--every", str(every), "--until-signal"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_periodic_fetch_keeps_deltas_and_stops_cleanly_on_sigterm(
    double: SysprobeDouble, short_dir: Path
) -> None:
    folder = short_dir / "sysprobe"
    proc = _periodic(double, folder, every=0.2)
    try:
        rounds = 0
        sent = 0
        for batch in range(3):
            rounds += 1
            _read_stdout_lines(proc, lambda ls, r=rounds: any(x.get("round") == r for x in ls), 10)
            double.add_http(
                request_summary((LO, 41000 + batch), (LO, 8443), "/server8443/identify", {200: 5})
            )
            sent += 5
        _read_stdout_lines(proc, lambda ls: any(x.get("round") == rounds + 1 for x in ls), 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = sorted(p.name for p in folder.iterdir())
    assert "http_monitoring.0001.json" in names and "connections.0004.json" in names
    assert not [n for n in names if n.endswith(".part")]
    summary = judge_dumps(folder, server_ports={8443})
    # Each file holds what arrived since the previous read: the sum is every request, once.
    assert summary["requests"] == sent
    assert summary["errors"] == []


def test_sigterm_during_a_fetch_finishes_that_fetch(
    double: SysprobeDouble, short_dir: Path
) -> None:
    two_server_sample(double)
    double.delay = 1.0
    folder = short_dir / "sysprobe"
    proc = _periodic(double, folder, every=30)
    try:
        assert double.request_seen.wait(10)
        proc.send_signal(signal.SIGTERM)  # the first answer is still a second away
        assert proc.wait(timeout=15) == 0
        assert proc.stdout is not None
        said = [json.loads(line) for line in proc.stdout.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {"round": 1, "ok": 2, "failed": 0} in said
    assert sum(e.count for e in iter_http_entries(folder / "http_monitoring.0001.json")) == 90
    assert not list(folder.glob("*.part"))


# -- streaming ------------------------------------------------------------------------------

MEASURE = """
import sys
from pathlib import Path
from usmlab.analysis.sysprobe_parse import iter_http_entries

def peak_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

before = peak_kb()
if sys.argv[2] == "stream":
    entries = requests = 0
    for entry in iter_http_entries(Path(sys.argv[1])):
        entries += 1
        requests += entry.count
else:  # the control: holding the document must show in the same measurement
    entries, requests, held = 0, 0, Path(sys.argv[1]).read_bytes()
print(entries, requests, peak_kb() - before)
"""


@pytest.mark.slow
def test_large_chunked_dump_is_fetched_and_parsed_in_constant_memory(
    double: SysprobeDouble, short_dir: Path
) -> None:
    count = 200_000
    double.large_http_entries = count
    out = short_dir / "big.json"
    done = run_fetch("--socket", str(double.socket_path), "--path", HTTP, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert double.encodings == ["chunked"]
    size_kb = out.stat().st_size // 1024
    assert size_kb > 40_000

    def measure(mode: str) -> list[int]:
        run = subprocess.run(
            [sys.executable, "-c", MEASURE, str(out), mode],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        return [int(x) for x in run.stdout.split()]

    entries, requests, growth_kb = measure("stream")
    assert entries == count
    assert requests == sum(1 + i % 3 for i in range(count))  # generated_entry's counts
    assert growth_kb < size_kb / 10, f"parser grew {growth_kb} kB for a {size_kb} kB dump"
    _, _, held_kb = measure("hold")
    assert held_kb > size_kb * 0.9  # the measurement does see a document held in memory


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=120, deadline=None)
@given(
    items=st.lists(json_values, max_size=8),
    chunk=st.integers(min_value=1, max_value=40),
    indent=st.sampled_from([None, 1]),
    wrap=st.booleans(),
)
def test_stream_reader_yields_what_json_loads_sees(
    items: list[Any], chunk: int, indent: int | None, wrap: bool, tmp_path_factory: Any
) -> None:
    doc: Any = {"skipped": {"a": ["]", '\\"{']}, "entries": items, "after": 1} if wrap else items
    path = tmp_path_factory.mktemp("doc") / "doc.json"
    path.write_text(json.dumps(doc, indent=indent), encoding="utf-8")
    saved = parse.CHUNK_CHARS
    parse.CHUNK_CHARS = chunk  # boundaries everywhere: inside strings, numbers, escapes
    try:
        got = list(iter_records(path, list_key="entries" if wrap else None))
    finally:
        parse.CHUNK_CHARS = saved
    assert got == json.loads(path.read_text(encoding="utf-8"))["entries" if wrap else slice(None)]


def test_damaged_dump_is_a_one_line_error_and_does_not_hide_the_others(tmp_path: Path) -> None:
    folder = tmp_path / "sysprobe"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "http_monitoring.0001.json")
    text = SAMPLE.read_text()
    (folder / "http_monitoring.0002.json").write_text(text[: len(text) // 2])
    with pytest.raises(AnalysisError, match=r"http_monitoring\.0002\.json: malformed JSON .*"):
        list(iter_http_entries(folder / "http_monitoring.0002.json"))
    summary = judge_dumps(folder, server_ports={8443, 9443})
    assert len(summary["errors"]) == 1 and "\n" not in summary["errors"][0]
    assert summary["misattributed_entries"] >= 1  # the intact file was still judged


# -- the verdict ----------------------------------------------------------------------------


@pytest.mark.parametrize("planted", [True, False])
def test_verdict_reports_a_planted_misattribution_and_a_foreign_pid(
    double: SysprobeDouble, short_dir: Path, planted: bool
) -> None:
    go = STATIC_TAG_GO
    double.add_http(
        request_summary((LO, 40100), (LO, 8443), "/server8443/identify", {200: 41}, static_tags=go),
        request_summary((LO, 40102), (LO, 9443), "/server9443/identify", {200: 39}, static_tags=go),
        request_summary((LO, 40106), (LO, 8443), "/server8443/identify", {200: 7, 503: 1}),
    )
    if planted:  # the two-server rule: a path naming 8443, recorded with server port 9443
        double.add_http(
            request_summary(
                (LO, 40104), (LO, 9443), "/server8443/identify", {200: 2}, static_tags=go
            )
        )
    double.set_connections(*lab_connections(stranger=planted))
    folder = short_dir / "sysprobe"
    assert fetch_all(double, folder).returncode == 0

    summary = judge_dumps(
        folder,
        server_ports={8443, 9443},
        client_pids={CLIENT_PID},
        server_pids={SERVER_8443_PID, SERVER_9443_PID},
    )
    assert summary["servers"]["8443"]["named_here"] == 49
    assert summary["pid_checks"]["checked"] == summary["lab_entries"]
    if not planted:
        assert summary["outcome"] == "consistent"
        assert summary["misattributed"] == [] and summary["pid_checks"]["foreign"] == []
        return
    assert summary["outcome"] == "misattribution"
    assert summary["misattributed_entries"] == 1 and summary["misattributed_requests"] == 2
    (wrong,) = summary["misattributed"]
    assert wrong["path"] == "/server8443/identify" and wrong["server_port"] == 9443
    assert wrong["reason"] == "wrong-server" and wrong["named_port"] == 8443
    assert wrong["client_pids"] == [CLIENT_PID] and "tls.library:go" in wrong["tags"]
    assert summary["servers"]["9443"]["named_elsewhere"] == 2
    # 41 + 39 + 2 tagged by USM itself; the stranger's 8 only through the connection's tags
    assert summary["tags"] == {"tls.library:go": 41 + 39 + 2 + 8}
    assert summary["pid_checks"]["not_client"] == 1
    assert [f["pids"] for f in summary["pid_checks"]["foreign"]] == [[STRANGER_PID]]


def test_flipped_direction_is_not_misattribution(tmp_path: Path) -> None:
    folder = tmp_path / "sysprobe"
    folder.mkdir()
    entries = [request_summary((LO, 8443), (LO, 40200), "/server8443/identify", {200: 3})]
    (folder / "http_monitoring.json").write_text(json.dumps(entries))
    summary = judge_dumps(folder, server_ports={8443, 9443})
    assert summary["outcomes"]["flipped"] == {"entries": 1, "requests": 3}
    assert summary["misattributed_entries"] == 0 and summary["servers"]["8443"]["requests"] == 3


def test_recorded_sample_is_made_by_the_double_and_shows_the_planted_entry(
    tmp_path: Path,
) -> None:
    fresh = tmp_path / "sample.json"
    write_sample(fresh)
    assert fresh.read_bytes() == SAMPLE.read_bytes()  # the data file is the double's output
    folder = tmp_path / "sysprobe"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "http_monitoring.json")
    summary = judge_dumps(folder)  # ports unknown: taken from the paths
    assert summary["server_ports"] == [8443, 9443]
    assert [(m["path"], m["server_port"]) for m in summary["misattributed"]] == [
        ("/server8443/identify", 9443)
    ]


# -- the controller side, on the local target ------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the fetcher runs as root")


@needs_root
def test_controller_collects_periodic_and_final_dumps(
    double: SysprobeDouble, short_dir: Path
) -> None:
    target = LocalTarget(work_dir=short_dir / "work")
    run_dir = short_dir / "run"
    run_dir.mkdir()
    run_id = "20261125T160102Z-two-servers-local"
    proc = start_periodic(
        target, str(KIT_DIR), str(run_dir), run_id, every=0.2, socket=str(double.socket_path),
        env={"USMLAB_RUN_ID": run_id, "USMLAB_NAME": "sysprobe-fetch", "USMLAB_ROLE": "sampler"},
    )  # fmt: skip
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    assert f"USMLAB_RUN_ID={run_id}".encode() in environ  # cleanup can find it after a crash
    try:
        two_server_sample(double)  # traffic after the first round, as a run does it
        double.set_connections(*lab_connections(stranger=False))
        time.sleep(0.5)
    finally:
        code = stop_periodic(target, proc)
    assert code == 0
    double.add_http(
        request_summary((LO, 40108), (LO, 9443), "/server9443/identify", {200: 4}), protocol="http2"
    )
    fetched = fetch_final(
        target, str(KIT_DIR), str(run_dir), run_id, socket=str(double.socket_path)
    )
    assert fetched.warnings == []
    names = {Path(f).name for f in fetched.files}
    assert {"http_monitoring.final.json", "http2_monitoring.final.json"} <= names
    assert "http_monitoring.0001.json" in names
    ids = {r.split("client_id=", 1)[1] for r in double.requests}
    assert ids == {u.split("client_id=", 1)[1] for u in endpoint_urls(run_id).values()}
    assert len(ids) == 3  # one per endpoint: they must not drain each other's deltas

    manifest = {
        "server_ports": [8443, 9443],
        "processes": [
            {"name": "client", "role": "client", "pid": CLIENT_PID},
            {"name": "server-8443", "role": "server", "pid": SERVER_8443_PID, "port": 8443},
            {"name": "server-9443", "role": "server", "pid": SERVER_9443_PID, "port": 9443},
        ],
    }
    summary = summarize_run(run_dir, manifest)
    assert summary is not None
    assert summary["requests"] == 41 + 39 + 2 + 8 + 4  # every request exactly once
    assert summary["by_protocol"]["http2"] == {"entries": 1, "requests": 4}
    assert summary["misattributed_entries"] == 1 and summary["pid_checks"]["not_client"] == 0


@needs_root
def test_controller_says_in_one_line_when_system_probe_is_absent(short_dir: Path) -> None:
    target = LocalTarget(work_dir=short_dir / "work")
    run_dir = short_dir / "run"
    run_dir.mkdir()
    missing = short_dir / "sysprobe.sock"
    with pytest.raises(UsmlabError) as caught:
        start_periodic(target, str(KIT_DIR), str(run_dir), "r1", socket=str(missing))
    assert str(caught.value) == (
        f"system-probe fetch failed: system-probe socket not found at {missing}"
        " (is system-probe running?)"
    )


@needs_root
def test_controller_fails_when_no_endpoint_answers(double: SysprobeDouble, short_dir: Path) -> None:
    double.failure = 500
    target = LocalTarget(work_dir=short_dir / "work")
    run_dir = short_dir / "run"
    run_dir.mkdir()
    with pytest.raises(
        UsmlabError,
        match=r"^system-probe fetch failed: round 1: system-probe "
        r"answered 500 .* for /network_tracer/connections\?client_id=usmlab-r2-",
    ):
        start_periodic(target, str(KIT_DIR), str(run_dir), "r2", socket=str(double.socket_path))
