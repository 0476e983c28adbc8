"""report.html for runs of each outcome, rendered in a real headless browser (Debian's chromium):
the page shows the verdict, the timeline plot is drawn, and a screenshot is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_verdict import Lab
from typer.testing import CliRunner

from usmlab.analysis.html import write_html
from usmlab.analysis.report import analyze_run, write_report
from usmlab.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
HEADLESS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def judged(lab: Lab) -> Path:
    run_dir = lab.write()
    write_report(analyze_run(run_dir), run_dir)
    return run_dir


def capture_works(tmp_path: Path) -> Path:
    lab = Lab(tmp_path)
    lab.manifest["parameters"] = {"url": "https://127.0.0.1:8443"}
    for seq in range(20):
        req = lab.request(seq)
        lab.serve(req)
        lab.captured(req)
    return judged(lab)


def misattribution(tmp_path: Path) -> Path:
    lab = Lab(tmp_path)
    for seq in range(20):
        req = lab.request(seq)
        lab.serve(req)
        if seq == 7:  # planted: captured only in another process
            lab.captured(req, client=("kafka-admin", 7778, 7777), server=None)
        else:
            lab.captured(req)
    return judged(lab)


def no_captures(tmp_path: Path) -> Path:
    lab = Lab(tmp_path)
    for seq in range(5):
        lab.serve(lab.request(seq))
    return judged(lab)


def browser(page: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", *flags,
         page.resolve().as_uri()],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip


@needs_chromium
@pytest.mark.parametrize(
    ("make", "outcome"),
    [(capture_works, "capture-works"), (misattribution, "misattribution"),
     (no_captures, "no-captures")],
)  # fmt: skip
def test_the_page_of_each_outcome_renders_with_its_timeline(tmp_path, make, outcome) -> None:
    import matplotlib.image

    page = write_html(make(tmp_path))
    dom = browser(page, tmp_path, "--dump-dom").stdout.decode("utf-8", "replace")
    assert f'class="verdict {outcome}"' in dom
    assert "<svg" in dom and "seconds since the first request" in dom  # the plot is in the page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", dom)  # nothing loaded from anywhere
    if outcome == "misattribution":
        assert "kafka-admin" in dom  # the evidence of the misattributed request
    if outcome == "capture-works":
        assert "All of them to one server: https://127.0.0.1:8443." in dom  # which server
    shot = tmp_path / "page.png"
    browser(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] == 900 and pixels.std() > 0.05  # drawn, not blank


def test_a_run_that_did_not_complete_says_so_before_its_counts(tmp_path) -> None:
    """The page and the terminal lead with the failure; the counts follow, qualified."""
    run_dir = misattribution(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(status="failed", error="none of the 20 requests succeeded")
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    page = write_html(run_dir).read_text()
    status = page.index('id="status">failed: none of the 20 requests succeeded')
    assert status < page.index('class="verdict unfinished-counts" id="verdict"')
    assert "only the requests made before it ended" in page
    table = CliRunner().invoke(app, ["analyze", str(run_dir)]).stdout.splitlines()
    assert table[0].split() == ["verdict", "misattribution", "(run", "failed:", "only", "the",
                                "requests", "made", "before", "it", "ended)"]  # fmt: skip
    manifest["status"] = "complete"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert 'id="status"' not in write_html(run_dir).read_text()


def test_open_writes_the_page_when_it_is_missing_and_prints_its_path(tmp_path) -> None:
    run_dir = misattribution(tmp_path)
    result = CliRunner().invoke(app, ["open", str(run_dir), "--no-browser"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str((run_dir / "report.html").resolve())
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    nothing = CliRunner().invoke(app, ["open", str(tmp_path / "nope")])
    assert nothing.exit_code == 2


def test_open_without_a_run_shows_the_newest_judged_run_in_runs(tmp_path, monkeypatch) -> None:
    """Right after `usmlab test`, `usmlab open` shows that run (a later unjudged one is skipped)."""
    runs = tmp_path / "runs"
    for name, started, make in (
        ("older", "2026-11-30T10:00:00Z", misattribution),
        ("newest", "2026-11-30T11:00:00Z", capture_works),
        ("unjudged", "2026-11-30T12:00:00Z", None),
    ):
        run_dir = runs / name
        (tmp_path / name).mkdir()
        if make:
            shutil.move(make(tmp_path / name), run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = json.loads((run_dir / "manifest.json").read_text()) if make else {}
        (run_dir / "manifest.json").write_text(json.dumps({**manifest, "started": started}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["open", "--no-browser"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str((runs / "newest" / "report.html").resolve())
    empty = CliRunner().invoke(app, ["open", str(runs / "unjudged")])
    assert empty.exit_code == 2
