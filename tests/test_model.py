"""The usm-model tracer: a model of USM's Go-TLS tuple caches in bpftrace, on the real Go client,
checked against the prediction from the client's own logs; its parser on literal lines; rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from labrun import free_port, needs_tracer, only_run_dir, read_jsonl, run_usmlab

from usmlab.analysis.model import (
    Tuple4,
    Write,
    drop_repeats,
    predict,
    predict_openssl,
    read_model_trace,
)
from usmlab.analysis.rates import rate
from usmlab.errors import UsageError
from usmlab.tracers.usm_model import parse_model_spec

LINES = [
    "USMLAB_TRACER_ATTACHED 2581815276138",
    "usmlab-model write ts=2588776140350 pid=9049 tid=9051 conn=c000190000 netfd=c00007c280 "
    "fd=11 true=100007f:58630-100007f:18443 model=100007f:58630-100007f:18443 owner=9049 via=2 "
    "http=1",
    "usmlab-model close ts=2588780715169 pid=9049 tid=9051 conn=c000190000 netfd=c00007c280 hit=1",
    "usmlab-model tcp_close ts=2588780784685 pid=9049 tid=9051 fd=11 "
    "true=100007f:58630-100007f:18443 found=1",
    "usmlab-model write ts=2588788963706 pid=9049 tid=9054 conn=c000191c00 netfd=c00007c780 fd=8 "
    "true=100007f:58664-100007f:18443 model=100007f:58608-100007f:9443 owner=9049 via=1 http=1",
]


def test_model_lines_parse_into_tuples_and_caches(tmp_path: Path) -> None:
    log = tmp_path / "tracer.log"
    log.write_text("\n".join(LINES) + "\n")
    trace = read_model_trace(log)
    first, second = trace.writes
    assert first.true == Tuple4("127.0.0.1", 58630, "127.0.0.1", 18443)
    assert not first.stale and first.via == "socket"
    assert second.stale and second.via == "fd"
    assert str(second.model) == "127.0.0.1:58608->127.0.0.1:9443"
    assert (trace.closes, trace.close_hits) == (1, 1)
    assert trace.socket_closes[0][1:3] == (9049, 11)


def test_a_repeated_entry_of_one_write_is_dropped() -> None:
    """Go restarts a function whose prologue grew the stack: the entry probe fires twice."""
    tup = Tuple4("127.0.0.1", 1, "127.0.0.1", 8443)
    first = Write(1.0, 7, 8, "c0", "f0", 5, tup, tup, 7, "socket")
    again = Write(1.002, 7, 8, "c0", "f0", 5, tup, tup, 7, "conn")
    later = Write(2.0, 7, 8, "c0", "f0", 5, tup, tup, 7, "conn")  # a real second write
    kept, repeats = drop_repeats([first, again, later])
    assert kept == [first, later] and repeats == 1


def _request(seq: int, port: int, conn: str, fd: int, start: float, server: int = 8443) -> dict:
    return {"seq": seq, "pid": 7, "local_port": port, "remote": f"127.0.0.1:{server}",
            "tls_conn": conn, "net_fd": f"f{conn}", "fd": fd, "start_mono": start,
            "conn_id": f"7-{seq}"}  # fmt: skip


def test_the_prediction_replays_each_key_over_the_client_logs() -> None:
    """Connection A is dropped without Close; B gets A's tls.Conn address (and fd): the pointer
    key answers B with A's tuple, a key with the netFD does not (B's netFD differs), and after
    C's Close its address is free again."""
    requests = [
        _request(0, 40001, "c1", 5, 1.0),
        {**_request(1, 40002, "c1", 5, 2.0), "net_fd": "fnew"},  # A's address, a new netFD
        _request(2, 40003, "c2", 6, 3.0),
        _request(3, 40004, "c2", 6, 5.0),
    ]
    closes = [{"event": "close", "pid": 7, "tls_conn": "c2", "mono": 4.0}]
    sockets = [(1.5, 7, 5, Tuple4("127.0.0.1", 40001, "127.0.0.1", 8443), True)]
    pointer = predict("pointer", False, requests, closes, [])
    assert (pointer["stale"], pointer["reused_addresses"]) == (1, 1)
    assert predict("pointer-fd", False, requests, closes, [])["stale"] == 0
    assert predict("pid-pointer", False, requests, closes, [])["stale"] == 1
    # The (pid, fd) cache: fd numbers 5 and 6 are each used twice; only fd 5's socket close
    # (in its own process) deletes its entry, so only request 3 gets an old tuple.
    fd_only = [{**r, "tls_conn": f"u{r['seq']}"} for r in requests]
    assert predict("pointer", True, fd_only, [], [])["stale_fd"] == 2
    assert predict("pointer", True, fd_only, [], sockets)["stale_fd"] == 1


def test_one_local_port_to_two_servers_is_two_connections_to_the_prediction() -> None:
    """Seen at 100,000 requests: port 48498 went to server A, then (same fd, no socket close
    seen) to server B; the fd cache answered B with A's tuple. An entry is its whole
    connection, not its local port, or that stale answer is predicted as a hit."""
    to_a = _request(0, 48498, "u0", 279, 1.0)
    to_b = {**_request(1, 48498, "u1", 279, 2.0), "remote": "127.0.0.1:9443"}
    assert predict("pointer", True, [to_a, to_b], [], [])["stale_fd"] == 1
    # A's socket closed (its ports both match): B's first write fills a fresh entry.
    closed = [(1.5, 7, 279, Tuple4("127.0.0.1", 48498, "127.0.0.1", 8443), True)]
    assert predict("pointer", True, [to_a, to_b], [], closed)["stale_fd"] == 0


def test_probe_times_order_the_replay_where_the_logs_cannot() -> None:
    """Another process's Close logged after a write it preceded (the logs time the calls):
    with the probes' times the replay sees the close first, as the caches did."""
    from usmlab.analysis.model import ProbeTimes

    first = {**_request(0, 40001, "c1", 5, 1.0), "pid": 8}
    second = _request(1, 40002, "c1", 6, 2.0)  # pid 7, the same tls.Conn address
    close = [{"event": "close", "pid": 8, "tls_conn": "c1", "mono": 2.0005}]  # logged late
    assert predict("pointer", False, [first, second], close, [])["stale"] == 1
    times = ProbeTimes(writes={(7, 40002, 8443): [2.001]}, closes={(8, 0xC1): [1.9995]})
    assert predict("pointer", False, [first, second], close, [], times)["stale"] == 0


OPENSSL_LINES = [
    "usmlab-model set_fd ts=12715252717917 pid=24449 tid=24450 conn=7ffff000d110 fd=5 had=0 prev=0",
    "usmlab-model set_fd ts=12715282065266 pid=24448 tid=24452 conn=7ffff000d110 fd=5 had=1 "
    "prev=24449",
    "usmlab-model write ts=12715290000000 pid=24449 tid=24450 conn=7ffff000d110 netfd=0 fd=5 "
    "true=100007f:60302-100007f:8443 model=100007f:60306-100007f:8443 owner=24448 via=0 http=1",
    "usmlab-model write ts=12715290000001 pid=24447 tid=24456 conn=7ffff0021270 netfd=0 fd=6 "
    "true=100007f:42622-100007f:9443 model=0:0-0:0 owner=0 via=3 http=1",
]


def test_openssl_model_lines_parse_with_their_takeovers(tmp_path: Path) -> None:
    log = tmp_path / "tracer.log"
    log.write_text("\n".join(OPENSSL_LINES) + "\n")
    trace = read_model_trace(log)
    assert trace.set_fds[1] == (12715.282065266, 24448, 0x7FFFF000D110, 5, True, 24449)
    taken, without = trace.writes
    assert taken.stale and taken.via == "conn" and taken.owner == 24448  # another process's
    assert without.via == "none" and not without.stale  # USM records nothing: not a wrong tuple


def _open(pid: int, ssl: str, fd: int, port: int, mono: float, event: str = "open") -> dict:
    return {"event": event, "pid": pid, "conn_id": f"{pid}-{port}", "ssl": ssl, "fd": fd,
            "local_port": port, "remote": "127.0.0.1:8443", "mono": mono}  # fmt: skip


def _write(pid: int, port: int, start: float) -> dict:
    return {"pid": pid, "conn_id": f"{pid}-{port}", "local_port": port,
            "remote": "127.0.0.1:8443", "start_mono": start}  # fmt: skip


def test_the_openssl_prediction_replays_takeovers_across_processes() -> None:
    """Processes 7 and 8 allocate their SSL object at the same address: 8's SSL_set_fd takes
    7's entry over, so 7's next write gets 8's tuple under the SSL* key, not with the pid."""
    from usmlab.analysis.model import ProbeTimes

    events = [_open(7, "aa0", 5, 40001, 1.0), _open(8, "aa0", 5, 40002, 2.0)]
    requests = [_write(7, 40001, 1.5), _write(8, 40002, 2.5), _write(7, 40001, 3.0)]
    pointer = predict_openssl("pointer", requests, events, ProbeTimes(), [])
    assert (pointer["stale"], pointer["cross_process"], pointer["reused_addresses"]) == (1, 1, 1)
    assert predict_openssl("pid-pointer", requests, events, ProbeTimes(), [])["stale"] == 0
    # 8's entry names fd 6, where 7 has no socket: 7's write resolves nothing (USM records
    # nothing), and 8's later write finds the entry unresolved, then its own socket.
    events = [_open(7, "aa0", 5, 40001, 1.0), _open(8, "aa0", 6, 40002, 2.0)]
    requests = [_write(7, 40001, 3.0), _write(8, 40002, 4.0)]
    moved = predict_openssl("pointer", requests, events, ProbeTimes(), [])
    assert (moved["missed"], moved["stale"]) == (1, 0)


def test_rates_carry_their_count_and_an_exact_interval() -> None:
    assert rate(0, 132_659)["text"] == "0 of 132,659: < 2.3e-5"
    r = rate(23, 2776)
    assert r["count"] == 23 and r["of"] == 2776
    low, high = r["ci95"]
    assert low < 23 / 2776 < high and low > 0.005 and high < 0.013
    assert rate(0, 0)["rate"] is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("usm-model", ("pointer", True)), ("usm-model:pointer-fd", ("pointer-fd", True)),
     ("usm-model:pid-pointer:read-socket", ("pid-pointer", False))],
)  # fmt: skip
def test_model_specs(spec: str, expected: tuple[str, bool]) -> None:
    assert parse_model_spec(spec) == expected


@pytest.mark.parametrize("spec", ["usm-model:nope", "usm-model:pointer:x", "usm-modelx"])
def test_bad_model_specs_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_model_spec(spec)


@pytest.mark.parametrize("spec", ["usm-model:pointer-fd", "usm-model:pointer:read-socket"])
def test_a_go_only_model_spec_on_python_workloads_is_refused_before_any_deployment(
    tmp_path: Path, spec: str
) -> None:
    done = run_usmlab("test", "openssl-reuse", "--target", "local", "--tracer", spec,
                      "--runs-dir", str(tmp_path / "runs"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Go" in done.stderr
    assert not (tmp_path / "runs").exists()


def scenario_run(tmp_path: Path, scenario: str, key: str, *extra: str) -> tuple[int, dict, str]:
    done = run_usmlab(
        "test", scenario, "--target", "local", "--tracer", f"usm-model:{key}",
        "--runs-dir", str(tmp_path / key), "--state-dir", str(tmp_path / "state"),
        "--servers", f"{free_port()},{free_port()}", *extra, timeout=300,
    )  # fmt: skip
    report = json.loads((only_run_dir(tmp_path / key) / "report.json").read_text())
    return done.returncode, report, done.stderr


def model_run(tmp_path: Path, key: str, *extra: str) -> tuple[int, dict, str]:
    return scenario_run(tmp_path, "churn", key, *extra)


@needs_tracer
def test_dropped_connections_meet_address_reuse_and_the_model_agrees_with_the_prediction(
    tmp_path: Path,
) -> None:
    """A client that closes nothing and forces GC: the runtime hands dropped tls.Conn addresses
    to new connections while the pointer-keyed entry is alive. The model's stale tuples equal
    the prediction from the client logs, for every key (whatever it is for the fixed keys)."""
    traffic = ("--count", "120", "--close-nothing", "--gc-every", "5", "--skip-close", "0")
    stale = {}
    for key in ("pointer", "pointer-fd", "pid-pointer"):
        code, report, err = model_run(tmp_path, key, *traffic)
        model = report["model"]
        assert model["agree"], model.get("finding")
        assert model["stale_observed"]["count"] == model["stale_predicted"]["count"]
        assert model["request_writes"] == 120  # a request may write twice: judged once
        assert model["writes"] >= 120
        stale[key] = model["requests"]["stale_tuple"]["count"]
        assert code == (1 if stale[key] else 0), err
    assert stale["pointer"] > 0  # the theory, reproduced on real Go runtime memory
    assert stale["pointer-fd"] < stale["pointer"]


@needs_tracer
def test_churn_as_it_reproduced_in_the_field_is_judged_by_the_model(tmp_path: Path) -> None:
    code, report, err = model_run(tmp_path, "pointer", "--count", "200")
    model = report["model"]
    assert model["agree"], model.get("finding")
    assert model["requests"]["judged"] == 200
    assert model["closes"] > 0  # net/http closes what it can
    assert code in (0, 1), err


@needs_tracer
def test_identical_processes_side_by_side_are_judged_across_processes(tmp_path: Path) -> None:
    """cross-process: three identical Go clients and a Python one, all killed and restarted
    with new PIDs mid-traffic; a key without the pid may meet another process's entry (a live
    one, or a killed one's). Whatever the count, the model and the prediction (all clients'
    logs) agree, and every stale answer's owner is named."""
    code, report, err = scenario_run(
        tmp_path, "cross-process", "pointer", "--count", "150", "--interval", "5ms",
        "--restart-after", "0.4s",
    )  # fmt: skip
    run_dir = only_run_dir(tmp_path / "pointer")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    names = [p["name"] for p in manifest["processes"] if p.get("role") == "client"]
    assert {"client-1", "client-py-1", "client-1-r1", "client-py-1-r1"} <= set(names)
    model = report["model"]
    assert model["agree"], model.get("finding")
    go_requests = [
        r for name in names
        if not name.startswith("client-py") and (run_dir / f"{name}.jsonl").exists()
        for r in read_jsonl(run_dir / f"{name}.jsonl")
        if r.get("local_port") is not None
    ]  # fmt: skip
    assert model["requests"]["judged"] + model["requests"]["not_seen"] == len(go_requests)
    assert model["requests"]["judged"] > 300  # before and after the restart
    python = [
        r for name in names
        if name.startswith("client-py") and (run_dir / f"{name}.jsonl").exists()
        for r in read_jsonl(run_dir / f"{name}.jsonl")
    ]  # fmt: skip
    assert python and all(r["status"] == 200 for r in python if r["error"] is None)
    assert report["tuples"]["requests_seen"] > 0  # the Python client's own connections
    collisions = model["cross_process_collisions"]["count"]
    assert collisions <= model["stale_observed"]["count"]
    assert code in (0, 1), err


@needs_tracer
def test_fd_reuse_is_judged_by_the_fd_cache(tmp_path: Path) -> None:
    code, report, err = scenario_run(tmp_path, "fd-reuse", "pointer-fd", "--duration", "4s",
                                     "--restart-after", "2s")  # fmt: skip
    model = report["model"]
    assert model["agree"], model.get("finding")
    assert model["writes"] > 20 and model["socket_closes"] > 0
    assert set(model["stale_by_cache"]) == {"conn", "fd", "socket"}
    assert code in (0, 1), err


@needs_tracer
def test_python_processes_at_the_same_addresses_take_each_others_openssl_entries(
    tmp_path: Path,
) -> None:
    """openssl-reuse: three Python clients with one memory layout allocate their SSL objects at
    the same addresses. Keyed by the SSL* alone (USM before its pid key), one process's
    SSL_set_fd takes another's entry and that process's next requests carry the other's tuple;
    with the pid in the key, none do. The eBPF model and the prediction from the clients' own
    logs (their SSL* addresses) agree on both."""
    stale = {}
    for key in ("pointer", "pid-pointer"):
        # 100 requests 20 ms apart, 2 s a client: the three clients' traffic overlaps even on a
        # busy machine (at full speed, one client may be done before the next has started).
        code, report, err = scenario_run(
            tmp_path, "openssl-reuse", key, "--count", "100", "--interval", "20ms"
        )
        model = report["model"]
        assert model["library"] == "openssl" and model["agree"], model.get("finding")
        assert model["requests"]["judged"] == 300  # three clients, 100 requests each
        stale[key] = model["stale_observed"]["count"]
        assert model["cross_process_collisions"]["count"] == stale[key]
        assert code == (1 if stale[key] else 0), err
        if key == "pointer":
            assert model["reused_addresses"]["count"] > 0  # the same SSL* in another process
    assert stale["pointer"] > 0 and stale["pid-pointer"] == 0
