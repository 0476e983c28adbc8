"""The local target honours the Target interface the runner relies on."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from usmlab.errors import UsmlabError
from usmlab.targets.base import CommandFailed
from usmlab.targets.local import LocalTarget


@pytest.fixture
def target(tmp_path):
    return LocalTarget(work_dir=tmp_path / "work")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_returns_output_and_exit_status(target):
    result = target.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandFailed, match="err"):
        target.run(["sh", "-c", "echo err >&2; exit 3"])


def test_arguments_are_passed_verbatim(target):
    tricky = ["a b", "'quoted'", '"dq"', "; touch pwned", "$(touch pwned)", "`x`"]
    result = target.run(["printf", "%s\\n", *tricky])
    assert result.stdout.splitlines() == tricky
    assert not Path("pwned").exists()


def test_missing_command_is_a_one_line_error(target):
    with pytest.raises(UsmlabError, match="command not found"):
        target.run(["no-such-command-usmlab"])


def test_sync_uploads_only_changed_files(target, tmp_path):
    src = tmp_path / "a.py"
    src.write_text("print(1)\n")
    kit = target.join(target.work_dir, "kit")
    assert target.sync({"a.py": src}, kit) == ["a.py"]
    assert target.sync({"a.py": src}, kit) == []
    src.write_text("print(2)\n")
    assert target.sync({"a.py": src}, kit) == ["a.py"]
    assert Path(kit, "a.py").read_text() == "print(2)\n"


def test_background_process_output_and_exit_code(target, tmp_path):
    out = str(tmp_path / "out.log")
    proc = target.start(["sh", "-c", "echo hello; exit 7"], name="t", stdout_path=out)
    assert target.wait(proc, 5) == 7
    assert Path(out).read_text() == "hello\n"


def test_stop_signals_the_whole_group_and_escalates(target, tmp_path):
    out = str(tmp_path / "out.log")
    # A parent that ignores SIGINT with a child in the same group: SIGTERM must end both.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = target.start([sys.executable, "-c", script], name="t", stdout_path=out)
    deadline = time.monotonic() + 10
    while not Path(out).read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(Path(out).read_text())
    assert os.getpgid(child) == proc.pgid
    seq = ((signal.SIGINT, 0.5), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))
    code = target.stop(proc, seq)
    assert code == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_background_process_is_in_its_own_session(target, tmp_path):
    proc = target.start(["sleep", "30"], name="t", stdout_path=str(tmp_path / "o"))
    try:
        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
    finally:
        target.stop(proc)
    assert not alive(proc.pid)


def test_fetch_dir_in_place_and_elsewhere(target, tmp_path):
    remote = tmp_path / "remote"
    (remote / "sub").mkdir(parents=True)
    (remote / "a.txt").write_text("a")
    (remote / "sub" / "b.txt").write_text("b")
    assert target.fetch_dir(str(remote), remote) == []
    assert target.list_files(str(remote)) == ["a.txt", "sub/b.txt"]
    local = tmp_path / "local"
    assert sorted(target.fetch_dir(str(remote), local)) == ["a.txt", "sub/b.txt"]
    assert (local / "sub" / "b.txt").read_text() == "b"
    # A second collection resumes: only what is missing or different is copied.
    (local / "a.txt").unlink()
    (local / "sub" / "b.txt").write_text("stale")
    assert sorted(target.fetch_dir(str(remote), local)) == ["a.txt", "sub/b.txt"]
    assert target.fetch_dir(str(remote), local) == []
