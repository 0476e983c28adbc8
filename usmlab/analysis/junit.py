"""`usmlab test --junit FILE`: the verdict as JUnit XML, which CI systems display.

One <testsuite> per run; one <testcase> per server port (or one for all requests), failing when
a request was misattributed or missed; one per extra check the run made (tuples, the model,
USM's maps), failing on stale or wrong tuples. A run that did not complete is an <error>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _case(suite: ET.Element, name: str, problems: list[str], seconds: float = 0.0) -> None:
    case = ET.SubElement(suite, "testcase", classname=suite.get("name", ""), name=name,
                         time=f"{seconds:.3f}")  # fmt: skip
    if problems:
        failure = ET.SubElement(case, "failure", message=problems[0], type="misattribution")
        failure.text = "\n".join(problems)


def _suite(root: ET.Element, run: Any) -> None:
    manifest, report = run.manifest, run.report
    suite = ET.SubElement(root, "testsuite", name=f"usmlab.{manifest.get('scenario', '?')}")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="run_dir",
                  value=str(run.run_dir))  # fmt: skip
    if run.status != "complete" or report is None:
        case = ET.SubElement(suite, "testcase", classname=suite.get("name", ""), name="run")
        error = ET.SubElement(case, "error", message=run.error or run.status, type=run.status)
        error.text = run.error or run.status
    elif report.outcome == "untraced":
        case = ET.SubElement(suite, "testcase", classname=suite.get("name", ""), name="requests")
        ET.SubElement(case, "skipped", message="no tracer ran: nothing was judged")
    else:
        requests = report.requests
        per_server = requests.get("per_server") or {"all": requests}
        for port, row in sorted(per_server.items()):
            problems = []
            if row.get("misattributed"):
                problems.append(f"{row['misattributed']} of {row['sent']} requests misattributed")
            if row.get("missed"):
                problems.append(f"{row['missed']} of {row['sent']} requests missed")
            name = "requests" if port == "all" else f"server :{port}"
            _case(suite, name, problems)
        extras = (
            ("tuples", report.tuples, lambda t: t["wrong_tuple"]["count"], "wrong-tuple writes"),
            ("model", report.model, lambda m: m["requests"]["stale_tuple"]["count"],
             "stale-tuple requests (model)"),
            ("usm maps", report.usm_maps,
             lambda u: sum(u[k]["stale_tuple"]["count"] for k in ("conn_tup_by_go_tls_conn",
                                                                   "tuple_by_pid_fd")),
             "stale-tuple requests (USM's maps)"),
        )  # fmt: skip
        for name, section, count, what in extras:
            if section is not None:
                found = count(section)
                _case(suite, name, [f"{found} {what}"] if found else [])
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", str(sum(1 for c in cases if c.find("error") is not None)))
    suite.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))


def write_junit(path: Path, runs: list[Any]) -> None:
    """One XML file for the runs of one command (a run, a fleet, a sweep)."""
    root = ET.Element("testsuites", name="usmlab")
    for run in runs:
        _suite(root, run)
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key, "0")) for s in root.findall("testsuite"))))
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
