"""The analysis entry points and their outputs: report.json, report.md and a terminal table.

`analyze_run` judges a run folder; `analyze_capture` judges a trace brought from elsewhere, with
roles given as `ROLE=PID` and threads from `ps -eLo pid,tid,comm` or threads.jsonl. The schema
of report.json is documented in docs/report-schema.md.
"""

from __future__ import annotations

import functools
import gc
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from usmlab.analysis.errors import AnalysisError
from usmlab.analysis.runfiles import (
    add_manifest_processes,
    add_workload_threads,
    read_client_log,
    read_server_log,
    read_thread_source,
    read_threads_jsonl,
    tracer_errors,
)
from usmlab.analysis.threads import ThreadMap
from usmlab.analysis.usm_maps import MAPS
from usmlab.analysis.verdict import LabContext, Verdict, correlate
from usmlab.analysis.verdict import exit_status as _outcome_status
from usmlab.jsonlines import read_jsonl
from usmlab.manifest import Manifest, run_tag

_P = ParamSpec("_P")
_R = TypeVar("_R")

SCHEMA_VERSION = 1
_ROLE_TIDS_CAP = 200


@dataclass
class Report:
    """Everything report.json holds (docs/report-schema.md)."""

    outcome: str
    requests: dict[str, int]
    foreign: list[dict[str, Any]]
    roles: dict[str, dict[str, Any]]
    lost_events: int
    unparsed_lines: int
    tracer: str | None
    trace_clock: str | None
    trace_lines: int
    message_counts: dict[str, int]
    unmatched_captures: list[dict[str, Any]]
    unmatched_captures_count: int
    events_by_process: dict[str, dict[str, Any]]
    hints: list[str]
    misattributed_requests: list[dict[str, Any]]
    missed_requests: list[int]
    trace: dict[str, Any]
    clock: dict[str, Any]
    source: dict[str, Any]
    lab_traffic_unmatched: int = 0
    server_records_unmatched: int = 0
    other_tracer_lines: int = 0
    model: dict[str, Any] | None = None  # --tracer usm-model: the model's caches, judged
    tuples: dict[str, Any] | None = None  # built-in tracer: each capture's connection, checked
    usm_maps: dict[str, Any] | None = None  # USM's own tuple caches, read while it ran
    schema_version: int = SCHEMA_VERSION
    system_probe: dict[str, Any] | None = None  # --tracer system-probe: its stats, judged

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, keys in a readable order."""
        return asdict(self)


def exit_status(report: Report | str) -> int:
    """The exit status for a report (or an outcome): 0 works/untraced, 1 misattribution,
    3 no captures."""
    return _outcome_status(report if isinstance(report, str) else report.outcome)


def _roles(threads: ThreadMap) -> dict[str, dict[str, Any]]:
    roles: dict[str, dict[str, Any]] = {}
    for proc in sorted(threads.processes(), key=lambda p: p.pid):
        if not proc.lab:
            continue
        name = proc.name or f"{proc.role}-{proc.pid}"
        if name in roles:
            name = f"{name}-{proc.pid}"
        roles[name] = {
            "pid": proc.pid,
            "role": proc.role,
            "tids": sorted(proc.tids)[:_ROLE_TIDS_CAP],
            **({"port": proc.port} if proc.port is not None else {}),
        }
    return roles


# Report fields that are the verdict's own, under the same name.
_FROM_VERDICT = (
    "outcome", "requests", "foreign", "message_counts", "unmatched_captures",
    "unmatched_captures_count", "events_by_process", "hints", "misattributed_requests",
    "missed_requests", "lab_traffic_unmatched", "server_records_unmatched", "other_tracer_lines",
)  # fmt: skip


def _build(verdict: Verdict, ctx: LabContext, source: dict[str, Any]) -> Report:
    stats = verdict.stats
    return Report(
        **{name: getattr(verdict, name) for name in _FROM_VERDICT},
        roles=_roles(ctx.threads),
        lost_events=stats.lost_events,
        unparsed_lines=stats.unparsed_lines,
        tracer=ctx.tracer,
        trace_clock=ctx.trace_clock,
        trace_lines=stats.lines,
        trace={
            "lines": stats.lines,
            "records": stats.records,
            "continuation_lines": stats.continuation_lines,
            "lost_lines": stats.lost_lines,
            "lost_by_cpu": {str(k): v for k, v in sorted(stats.lost_by_cpu.items())},
            "unparsed_lines": stats.unparsed_lines,
            "empty_lines": stats.empty_lines,
            "first_ts": verdict.first_ts,
            "last_ts": verdict.last_ts,
        },
        clock={"offset": verdict.clock_offset, "source": verdict.clock_offset_source},
        source=source,
    )


def _gc_paused(analysis: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run an analysis with the cyclic garbage collector paused: it allocates millions of
    short-lived tuples and builds no reference cycles worth collecting, and each collection
    would walk every object the analysis holds (about 5% of a large analysis)."""

    @functools.wraps(analysis)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return analysis(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


@_gc_paused
def analyze_run(run_dir: Path, workers: int | None = None) -> Report:
    """Judge a run folder (docs/formats.md). Every input is optional except that a folder
    must exist; corrupt inputs raise AnalysisError with a one-line message."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: no such run folder")
    manifest = Manifest.read(run_dir, missing_ok=True)
    threads = ThreadMap()
    add_manifest_processes(threads, manifest)
    if (run_dir / "threads.jsonl").exists():
        read_threads_jsonl(threads, run_dir / "threads.jsonl")
    client_logs = manifest.client_logs
    server_logs = manifest.logs("server")
    requests = [r for path in client_logs for r in read_client_log(path)]
    requests.sort(key=lambda r: (r.start, r.seq))
    records = [r for path in server_logs for r in read_server_log(path)]
    add_workload_threads(threads, requests, records)
    # Requests that started before the tracer attached (the `preexisting` scenario) could
    # not be seen by it: judged apart, not counted as missed.
    attached = manifest.get("tracer_attached_mono")
    before_attach = 0
    if isinstance(attached, int | float) and manifest.get("trace_clock") == "mono":
        kept = [r for r in requests if r.start >= attached]
        before_attach = len(requests) - len(kept)
        requests = kept
    tracer = manifest.get("tracer") if isinstance(manifest.get("tracer"), str) else None
    clock = manifest.get("trace_clock") if isinstance(manifest.get("trace_clock"), str) else None
    ctx = LabContext(
        requests=requests,
        server_records=records,
        threads=threads,
        trace_clock=clock,
        tracer=tracer,
        tracer_errors=tracer_errors(run_dir / "tracer.log"),
        has_client_log=bool(client_logs),
        run_tag=run_tag(manifest["run_id"]) if isinstance(manifest.get("run_id"), str) else None,
    )
    trace = run_dir / "trace_pipe.log"
    verdict = correlate(ctx, trace if trace.exists() else None, workers)
    if before_attach:
        verdict.requests["before_attach"] = before_attach
    system_probe = None
    if tracer == "system-probe":
        # No trace: system-probe's own stats are the capture, judged by the two-server rule
        # and the PID checks (usmlab/sysprobe).
        from usmlab.analysis.sysprobe_verdict import summarize_run

        summary = system_probe = summarize_run(run_dir, manifest)
        if summary is None or not summary.get("lab_requests"):
            verdict.outcome = "no-captures"
        elif summary.get("outcome") == "misattribution":
            verdict.outcome = "misattribution"
        else:
            verdict.outcome = "capture-works"
    if not trace.exists() and tracer != "none":
        verdict.hints.insert(0, "no trace_pipe.log in the run folder: the capture did not run")
    from usmlab.analysis.tuples import tuples_section

    tuples = tuples_section(run_dir, requests)
    if tuples is not None and tuples["wrong_tuple"]["count"] and verdict.outcome != "no-captures":
        # A capture that names a connection none of its process's requests used.
        verdict.outcome = "misattribution"
        verdict.requests["misattributed_tuple"] = tuples["wrong_tuple"]["count"]
    from usmlab.analysis.usm_maps import usm_maps_section

    usm_maps = None
    if (run_dir / "usm_maps.jsonl").exists():
        raw = [r for log in client_logs for r in read_jsonl(log)]
        usm_maps = usm_maps_section(run_dir / "usm_maps.jsonl", raw)
    if usm_maps is not None:
        stale_maps = sum(usm_maps[m]["stale_tuple"]["count"] for m in MAPS)
        if stale_maps:
            # USM's own cache held another connection's tuple for these requests.
            verdict.outcome = "misattribution"
            verdict.requests["misattributed_usm_maps"] = stale_maps
    model = None
    if isinstance(tracer, str) and tracer.startswith("usm-model"):
        from usmlab.analysis.model import model_section

        model = model_section(run_dir, manifest)
        if model is not None:
            stale = model["requests"]["stale_tuple"]["count"]
            if stale and verdict.outcome != "no-captures":
                # The model's stale tuples are misattributions as USM would record them.
                verdict.outcome = "misattribution"
                verdict.requests["misattributed_model"] = stale
            if not model["agree"]:
                verdict.hints.insert(0, f"model and prediction disagree: {model['finding']}")
    source = {
        "run_dir": str(run_dir),
        "run_id": manifest.get("run_id"),
        "scenario": manifest.get("scenario"),
        "target": manifest.get("target"),
        "status": manifest.get("status"),
    }
    report = _build(verdict, ctx, source)
    report.system_probe = system_probe
    report.model = model
    report.tuples = tuples
    report.usm_maps = usm_maps
    return report


def parse_role_pairs(pairs: list[str]) -> dict[str, list[int]]:
    """`ROLE=PID` command-line pairs (`client=123`, `server-9443=456`) into name -> pids."""
    roles: dict[str, list[int]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise AnalysisError(f"bad role {pair!r}: expected ROLE=PID, e.g. client=1234")
        roles.setdefault(name, []).append(int(value))
    return roles


@_gc_paused
def analyze_capture(
    trace: Path,
    roles: dict[str, list[int]],
    threads_file: Path | None = None,
    client_log: Path | None = None,
    server_log: Path | None = None,
    workers: int | None = None,
) -> Report:
    """Judge a raw trace_pipe capture from elsewhere. `roles` maps lab process names to pids
    (client*, server*); `threads_file` is threads.jsonl or `ps -eLo pid,tid,comm` output; the
    trace clock is unknown, so with a client log the offset to its monotonic times is estimated."""
    trace = Path(trace)
    if not trace.is_file():
        raise AnalysisError(f"{trace}: no such trace file")
    for name, pids in roles.items():
        if not name or any(not isinstance(p, int) or p <= 0 for p in pids):
            raise AnalysisError(f"bad role {name!r}: pids must be positive integers")
    for optional in (threads_file, client_log, server_log):
        if optional is not None and not Path(optional).is_file():
            raise AnalysisError(f"{optional}: no such file")
    threads = ThreadMap()
    if threads_file is not None:
        read_thread_source(threads, Path(threads_file))
    threads.add_roles(roles)
    requests = read_client_log(Path(client_log)) if client_log is not None else []
    records = read_server_log(Path(server_log)) if server_log is not None else []
    add_workload_threads(threads, requests, records)
    ctx = LabContext(
        requests=requests,
        server_records=records,
        threads=threads,
        trace_clock=None,
        tracer=None,
        has_client_log=client_log is not None,
    )
    verdict = correlate(ctx, trace, workers)
    source = {
        "trace": str(trace),
        "threads_file": str(threads_file) if threads_file else None,
        "client_log": str(client_log) if client_log else None,
    }
    return _build(verdict, ctx, source)


# -- outputs ------------------------------------------------------------------------------------

_OUTCOME_TEXT = {
    "capture-works": "capture works: requests were attributed to the client",
    "misattribution": "MISATTRIBUTION: requests were attributed to another process",
    "no-captures": "no captures: the tracer recorded none of the lab's requests",
    "untraced": "untraced: this run had no tracer (by design)",
}


def _foreign_text(entry: dict[str, Any]) -> str:
    pid = entry.get("pid")
    who = f"pid {pid}" if pid is not None else f"unknown pid (tid {entry.get('tid')})"
    return f"{who} {entry.get('comm')!s} ({entry.get('captures')} captures)"


def status_note(status: str | None) -> str:
    """What a run's status says of its counts, for the verdict line (report.html says the same):
    a run that did not complete judged only the requests made before it ended (`usmlab
    summary` pools an interrupted run's, not a failed one's: analysis/runs.py)."""
    if status in (None, "complete"):
        return ""
    return f"run {status}: only the requests made before it ended"


def render_table(report: Report, status: str | None = None) -> str:
    """A short plain-text summary for the terminal (at most ~15 lines); `status`: the run's,
    when it did not complete."""
    r = report.requests
    note = status_note(status)
    lines = [
        f"verdict          {report.outcome}" + (f"  ({note})" if note else ""),
        f"requests sent    {r.get('sent', 0)}",
        f"  in client      {r.get('captured_client', 0)}",
        f"  in server      {r.get('captured_server', 0)}",
        f"  misattributed  {r.get('misattributed', 0)}",
        f"  missed         {r.get('missed', 0)}",
    ]
    if r.get("before_attach"):
        lines.append(f"  before attach  {r['before_attach']} (not judged: no tracer yet)")
    for port, row in sorted((r.get("per_server") or {}).items()):
        lines.append(
            f"  server :{port:<6} sent {row['sent']}, in client {row['captured_client']}, "
            f"misattributed {row['misattributed']}, missed {row['missed']}"
        )
    if report.misattributed_requests:
        first = report.misattributed_requests[0]
        lines.append(
            f"  first wrong    seq {first['seq']} {first['path']} -> pid {first['pid']} "
            f"tid {first['tid']} {first['comm']}"
        )
    if report.usm_maps is not None:
        u = report.usm_maps
        for name in MAPS:
            lines.append(
                f"usm map {name[:15]:<15} stale {u[name]['stale_tuple']['text']}; "
                f"not seen {u[name]['not_seen']} of {u['requests']} ({u['dumps']} dumps)"
            )
    if report.tuples is not None:
        t = report.tuples
        lines.append(
            f"tuples           {t['wrong_tuple']['count']} of {t['client_writes']} client writes "
            f"on a connection no request used; requests without a tuple {t['not_seen']}"
            + (
                f"; UNREADABLE {t['unreadable']} (the tracer could not follow the connection)"
                if t.get("unreadable")
                else ""
            )
        )
    if report.model is not None:
        m = report.model
        lines.append(
            f"model            {m.get('library', 'go')} cache, key {m['key']}: stale tuples "
            f"{m['stale_observed']['text']}; predicted {m['stale_predicted']['text']}; "
            f"across processes {m['cross_process_collisions']['text']}; "
            f"address reuse {m['reused_addresses']['text']}"
        )
        lines.append(
            f"  requests       stale-tuple {m['requests']['stale_tuple']['text']}, against "
            f"another server {m['requests']['wrong_server']['text']}"
        )
    if report.server_records_unmatched:
        lines.append(f"server records   {report.server_records_unmatched} nobody in this run sent")
    if report.other_tracer_lines:
        lines.append(f"other tracer     {report.other_tracer_lines} lines of another usmlab run")
    if report.foreign:
        shown = ", ".join(_foreign_text(f) for f in report.foreign[:3])
        more = f" (+{len(report.foreign) - 3} more)" if len(report.foreign) > 3 else ""
        lines.append(f"foreign          {shown}{more}")
    others = [
        f"{key} {entry.get('comm') or '<...>'}"
        for key, entry in report.events_by_process.items()
        if entry.get("other")
    ]
    if others:
        more = f" (+{len(others) - 3} more)" if len(others) > 3 else ""
        lines.append(f"other HTTP in    {', '.join(others[:3])}{more}")
    lines.append(f"trace lines      {report.trace_lines}")
    lines.append(f"lost events      {report.lost_events}")
    lines.append(f"unparsed lines   {report.unparsed_lines}")
    for hint in report.hints[:2]:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def render_markdown(report: Report) -> str:
    """report.md: the verdict for a human, with the evidence behind it."""
    r = report.requests
    src = report.source
    title = src.get("run_id") or src.get("trace") or src.get("run_dir") or "capture"
    out = [
        f"# usmlab report: {title}",
        "",
        f"**Verdict: {report.outcome}** - {_OUTCOME_TEXT.get(report.outcome, '')}",
        "",
        f"Tracer: {report.tracer or 'unknown'}; trace clock: {report.trace_clock or 'unknown'} "
        f"(offset {report.clock.get('offset')} s, {report.clock.get('source')}).",
        "",
        "## Requests",
        "",
        *_md_table(
            [
                "sent",
                "captured in client",
                "captured in server",
                "misattributed",
                "missed",
                "failed",
            ],
            [
                [
                    r.get("sent", 0),
                    r.get("captured_client", 0),
                    r.get("captured_server", 0),
                    r.get("misattributed", 0),
                    r.get("missed", 0),
                    r.get("failed", 0),
                ]
            ],
        ),
        "",
    ]
    if report.misattributed_requests:
        out += ["## Misattributed requests", ""]
        out += _md_table(
            ["seq", "path", "pid", "tid", "comm", "reason"],
            [
                [m["seq"], m["path"], m["pid"], m["tid"], m["comm"], m["reason"]]
                for m in report.misattributed_requests
            ],
        )
        out.append("")
    if report.foreign:
        out += ["## Foreign processes (outside the lab, with lab paths)", ""]
        out += _md_table(
            ["pid", "tid", "comm", "captures", "paths"],
            [
                [f["pid"], f["tid"], f["comm"], f["captures"], ", ".join(f["paths"])]
                for f in report.foreign
            ],
        )
        out.append("")
    if report.missed_requests:
        shown = ", ".join(str(s) for s in report.missed_requests[:50])
        out += [f"## Missed requests ({r.get('missed', 0)})", "", f"seq: {shown}", ""]
    if report.unmatched_captures_count:
        out += [f"## Captures matching no request ({report.unmatched_captures_count})", ""]
        out += _md_table(
            ["ts", "pid", "tid", "comm", "path"],
            [
                [u["ts"], u["pid"], u["tid"], u["comm"], u["path"]]
                for u in report.unmatched_captures
            ],
        )
        out.append("")
    if report.events_by_process:
        out += ["## HTTP events by process", ""]
        out += _md_table(
            ["process", "name", "role", "comm", "events", "neither client nor server"],
            [
                [
                    key,
                    e["name"] or "",
                    e["role"] or "",
                    e["comm"] or "",
                    ", ".join(f"{k}={v}" for k, v in e["counts"].items()),
                    "yes" if e["other"] else "",
                ]
                for key, e in report.events_by_process.items()
            ],
        )
        out.append("")
    if report.roles:
        out += ["## Lab processes", ""]
        out += _md_table(
            ["name", "pid", "role", "threads"],
            [[name, v["pid"], v["role"], len(v["tids"])] for name, v in report.roles.items()],
        )
        out.append("")
    t = report.trace
    out += [
        "## Trace",
        "",
        f"{t['lines']} lines, {t['records']} records, {t['continuation_lines']} continuation "
        f"lines, {report.lost_events} lost events, {report.unparsed_lines} unparsed lines.",
        "",
    ]
    if report.message_counts:
        out += _md_table(["kind", "count"], [[k, v] for k, v in report.message_counts.items()])
        out.append("")
    if report.hints:
        out += ["## Hints", ""] + [f"- {h}" for h in report.hints] + [""]
    return "\n".join(out)


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.md into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path
