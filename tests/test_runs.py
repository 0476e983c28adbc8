"""Runs that add up: `usmlab runs`, `summary`, `compare` on recorded run folders, and the JUnit
XML of `usmlab test --junit`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from labrun import free_port, run_usmlab
from typer.testing import CliRunner

from usmlab.cli import app


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`usmlab summary` writes summary.html in the working folder unless told otherwise."""
    monkeypatch.chdir(tmp_path)


def recorded_run(
    root: Path, name: str, *, scenario: str = "churn", tracer: str = "builtin", sent: int,
    misattributed: int, missed: int = 0, key: str | None = None, status: str = "complete",
    outcome: str | None = None,
) -> Path:  # fmt: skip
    run = root / name
    run.mkdir(parents=True)
    manifest = {"run_id": name, "started": f"2026-11-30T{name}", "scenario": scenario,
                "target": {"label": "local"}, "tracer": tracer, "status": status}  # fmt: skip
    requests = {"sent": sent, "misattributed": misattributed, "missed": missed}
    outcome = outcome or ("misattribution" if misattributed else "capture-works")
    report = {"outcome": outcome, "requests": requests,
              "model": {"key": key} if key else None}  # fmt: skip
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_runs_lists_one_line_per_run_and_as_json(tmp_path: Path) -> None:
    recorded_run(tmp_path, "10:00:00", sent=100, misattributed=2)
    recorded_run(tmp_path, "11:00:00", scenario="scenario3", sent=50, misattributed=0, missed=1)
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and "churn" in lines[1] and "scenario3" in lines[2]
    rows = json.loads(CliRunner().invoke(app, ["runs", str(tmp_path), "--json"]).output)
    assert [(r["scenario"], r["sent"], r["misattributed"], r["missed"]) for r in rows] == [
        ("churn", 100, 2, 0), ("scenario3", 50, 0, 1),
    ]  # fmt: skip


def test_summary_pools_counts_with_their_intervals_per_group(tmp_path: Path) -> None:
    recorded_run(tmp_path, "a", sent=80_000, misattributed=0, key="pointer-fd")
    recorded_run(tmp_path, "b", sent=83_000, misattributed=0, key="pointer-fd")
    recorded_run(tmp_path, "c", sent=2776, misattributed=23, key="pointer")
    page = tmp_path / "summary.html"
    result = CliRunner().invoke(
        app, ["summary", str(tmp_path), "--by", "key", "--json", "--html", str(page)]
    )
    assert result.exit_code == 0, result.output
    groups = {g["group"]: g for g in json.loads(result.stdout)}
    fixed = groups["pointer-fd"]
    assert (fixed["runs"], fixed["sent"]) == (2, 163_000)
    assert fixed["misattributed"]["text"] == "0 of 163,000: < 1.8e-5"
    before = groups["pointer"]["misattributed"]
    assert before["count"] == 23 and before["of"] == 2776
    low, high = before["ci95"]
    assert 0.0052 < low < 0.0053 and 0.0124 < high < 0.0125  # Clopper-Pearson
    table = (
        CliRunner()
        .invoke(app, ["summary", str(tmp_path / "c"), "--html", str(tmp_path / "c.html")])
        .output
    )
    assert "23 of 2,776" in table
    text = page.read_text()
    assert "<svg" in text and "pointer-fd" in text and "0 of 163,000: &lt; 1.8e-5" in text


def test_summary_leaves_out_runs_that_measured_nothing_and_says_so(tmp_path: Path) -> None:
    """A failed run's "misattributed" (someone else's traffic its tracer saw while none of its
    own requests got through) must not move the pooled rate; nor an untraced or blind run's.
    A run stopped by Ctrl-C (how a day-long `--count 0` run ends) counts."""
    recorded_run(tmp_path, "a", sent=100, misattributed=0)
    recorded_run(tmp_path, "b", sent=20, misattributed=3, status="failed")
    recorded_run(tmp_path, "c", sent=50, misattributed=1, status="interrupted")
    recorded_run(tmp_path, "d", sent=40, misattributed=0, tracer="none", outcome="untraced")
    recorded_run(tmp_path, "e", sent=30, misattributed=0, missed=30, outcome="no-captures")
    recorded_run(tmp_path, "f", sent=10, misattributed=0, status="abandoned")
    result = CliRunner().invoke(app, ["summary", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    (group,) = json.loads(result.stdout)
    assert (group["runs"], group["sent"], group["misattributed"]["count"]) == (2, 150, 1)
    assert group["left_out"] == {"abandoned": 1, "failed": 1, "no-captures": 1, "untraced": 1}
    table = CliRunner().invoke(app, ["summary", str(tmp_path)]).output
    assert "(1 abandoned, 1 failed, 1 no-captures, 1 untraced)" in table
    listing = CliRunner().invoke(app, ["runs", str(tmp_path)]).output.splitlines()
    assert [line.split()[4] for line in listing[1:]] == [
        "capture-works", "failed", "interrupted", "untraced", "no-captures", "abandoned",
    ]  # fmt: skip
    only_failed = CliRunner().invoke(
        app, ["compare", str(tmp_path / "a"), "--", str(tmp_path / "b")]
    )
    assert only_failed.exit_code == 2 and "no traced run to count" in only_failed.output


def test_compare_tells_before_from_after_a_fix(tmp_path: Path) -> None:
    before = recorded_run(tmp_path, "before", sent=11_113, misattributed=23)
    after = recorded_run(tmp_path, "after", sent=132_659, misattributed=0)
    same = recorded_run(tmp_path, "same", sent=11_000, misattributed=22)
    differ = CliRunner().invoke(app, ["compare", "--json", str(before), "--", str(after)])
    assert differ.exit_code == 0, differ.output
    result = json.loads(differ.output)
    assert result["differ"] and result["p_value"] < 1e-10
    alike = CliRunner().invoke(app, ["compare", str(before), "--", str(same)])
    assert "no significant difference" in alike.output
    missing = CliRunner().invoke(app, ["compare", str(before), str(after)])
    assert missing.exit_code == 2 and "A... -- B..." in missing.output


def test_junit_xml_has_a_case_per_server_and_fails_on_misattribution(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    done = run_usmlab(
        "test", "scenario1", "--target", "local", "--tracer", "none", "--count", "2",
        "--interval", "0", "--runs-dir", str(tmp_path / "runs"), "--state-dir",
        str(tmp_path / "state"), "--url", f"https://127.0.0.1:{free_port()}",
        "--junit", str(junit),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "usmlab.scenario1"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("1", "0", "1")

    from usmlab.analysis.junit import write_junit
    from usmlab.analysis.report import analyze_run

    class Run:  # a recorded misattributed run, as `usmlab test` hands it over
        status, error = "complete", None

    lab = recorded_run(tmp_path / "r", "x", sent=4, misattributed=1)
    Run.run_dir, Run.manifest = lab, json.loads((lab / "manifest.json").read_text())
    Run.report = analyze_run(lab)
    Run.report.requests = {
        "sent": 4,
        "misattributed": 1,
        "missed": 0,
        "per_server": {
            "8443": {"sent": 2, "misattributed": 1, "missed": 0},
            "9443": {"sent": 2, "misattributed": 0, "missed": 0},
        },
    }
    Run.report.outcome = "misattribution"
    write_junit(junit, [Run])
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("2", "1")
    failed = [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None]
    assert failed == ["server :8443"]


def test_scenarios_and_doctor_speak_json() -> None:
    from usmlab.scenarios import SCENARIOS

    listed = json.loads(CliRunner().invoke(app, ["scenarios", "--json"]).output)
    assert [s["name"] for s in listed] == list(SCENARIOS)
    assert all({"goal", "description", "parameters"} <= set(s) for s in listed)
    doctor = run_usmlab("doctor", "--json", "--port", str(free_port()))
    checks = json.loads(doctor.stdout)
    assert {"name", "ok", "detail", "hint"} <= set(checks[0])
    assert any(c["name"] == "USM maps readable" for c in checks)


def test_shell_completion_lists_the_scenarios() -> None:
    import os
    import subprocess
    import sys

    from usmlab.scenarios import SCENARIOS

    env = {**os.environ, "_USMLAB_COMPLETE": "complete_bash", "COMP_WORDS": "usmlab test ",
           "COMP_CWORD": "2"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "usmlab"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout.split() == list(SCENARIOS)
    env["COMP_WORDS"] = "usmlab test ch"
    done = subprocess.run([sys.executable, "-m", "usmlab"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout.split() == ["churn"]
