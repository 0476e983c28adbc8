"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sshd import SshdFactory, SshdUnavailable, SshServer


@pytest.fixture(autouse=True, scope="session")
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """usmlab's default state (work dir, certificates) lives in the session's temporary folder:
    the suite never writes the user's ~/.local/state/usmlab, and a lab the user runs beside it
    never has its kit's CA replaced by a test's."""
    import os

    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(autouse=True)
def _html_writers_done(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A run's report.html is written by a detached process after it returns; a test's runs'
    writers end before the next test starts, so no test shares the CPU with the last one's."""
    yield
    from usmlab.analysis.html import HTML_WRITER_PID, html_written

    base = tmp_path_factory.getbasetemp()
    for pid_file in base.glob(f"*/**/{HTML_WRITER_PID}"):
        html_written(pid_file.parent)
        pid_file.unlink(missing_ok=True)


# --- a real OpenSSH server on 127.0.0.1 (see tests/sshd.py) ---------------------------------


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdFactory]:
    """Starts throwaway sshd servers; every one is stopped (by PID) at the end of the session."""
    try:
        factory = SshdFactory(tmp_path_factory.mktemp("sshd"))
    except SshdUnavailable as exc:
        pytest.skip(str(exc))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def sshd_server(sshd_factory: SshdFactory) -> SshServer:
    """One sshd for the session; `sshd_server.start_another()` gives an independent second one."""
    return sshd_factory.start()
