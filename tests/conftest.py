"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sshd import SshdFactory, SshdUnavailable, SshServer

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
