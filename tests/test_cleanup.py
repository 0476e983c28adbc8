"""`usmlab cleanup` ends what crashed runs left behind, and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from labrun import processes_of_run, run_usmlab


def start_tagged(run_id: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "USMLAB_RUN_ID": run_id, "USMLAB_NAME": "server"}
    return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def mark(work_dir: Path, run_id: str, pid: int, run_dir: Path) -> None:
    (work_dir / "active").mkdir(parents=True, exist_ok=True)
    marker = {"pid": pid, "run_dir": str(run_dir)}
    (work_dir / "active" / run_id).write_text(json.dumps(marker))


def test_only_processes_of_dead_runs_in_this_work_dir_are_ended(tmp_path):
    work = tmp_path / "work"
    crashed = start_tagged("crashed-run")
    live = start_tagged("live-run")
    stranger = start_tagged("other-work-dir-run")  # no marker here: not ours
    try:
        mark(work, "crashed-run", dead_pid(), tmp_path / "crashed")
        mark(work, "live-run", os.getpid(), tmp_path / "live")
        done = run_usmlab("cleanup", "--target", "local", "--work-dir", str(work))
        assert done.returncode == 0, done.stderr
        assert f"ended pid {crashed.pid}" in done.stdout
        crashed.wait(timeout=10)
        time.sleep(0.2)
        assert processes_of_run("crashed-run") == []
        assert processes_of_run("live-run") == [live.pid]
        assert processes_of_run("other-work-dir-run") == [stranger.pid]
        assert not (work / "active" / "crashed-run").exists()
        assert (work / "active" / "live-run").exists()
        again = run_usmlab("cleanup", "--target", "local", "--work-dir", str(work))
        assert "nothing to clean up" in again.stdout
    finally:
        for proc in (crashed, live, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
