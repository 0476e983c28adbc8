"""`usmlab build` over SSH against a datadog-agent checkout DOUBLE.

The real build needs the datadog-agent sources and its toolchain, which cannot exist here: a
fake checkout holds a `dda` test double that prints build-like lines and writes
bin/usm-debugger (or fails like the upstream revision that did not compile). Everything else is
real: sshd on 127.0.0.1, the login shell that must find `dda` on the PATH ~/.profile sets,
streaming, the build record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from labrun import run_usmlab

from usmlab.errors import EXIT_FAILED

DDA_DOUBLE = """#!/bin/sh
# dda TEST DOUBLE for usmlab's tests (not Datadog's dda)
echo "dda double: $*"
test "$1 $2" = "inv system-probe.build-usm-debugger" || { echo "unexpected: $*" >&2; exit 3; }
if [ -e FAIL ]; then
    echo "pkg/network/usm/debugger/cmd/usm_debugger.go:46:4: undefined: cleaners" >&2
    exit 1
fi
ls pkg/ebpf/bytecode/build 2>/dev/null | sed 's/^/objects: /'
mkdir -p bin && printf 'usm-debugger built for %s\\n' "$3" > bin/usm-debugger
echo "build done"
"""


@pytest.fixture
def agent(sshd_server, tmp_path):
    checkout = tmp_path / "datadog-agent"
    (checkout / "pkg/ebpf/bytecode/build/x86_64").mkdir(parents=True)
    (checkout / "pkg/ebpf/bytecode/build/x86_64/usm-debug.o").write_text("stale")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "dda").write_text(DDA_DOUBLE)
    (tools / "dda").chmod(0o755)
    profile = Path(sshd_server.home) / ".profile"
    profile.write_text(f'export PATH="{tools}:$PATH"\n')
    yield checkout
    profile.unlink()


def build_args(sshd_server, agent, tmp_path, *extra):
    return [
        "build", "--target", sshd_server.spec, "--identity", str(sshd_server.key_path),
        "--agent-dir", str(agent), "--record", str(tmp_path / "build.json"), *extra,
    ]  # fmt: skip


def test_build_streams_output_and_records_the_binary(sshd_server, agent, tmp_path):
    done = run_usmlab(*build_args(sshd_server, agent, tmp_path, "--arch", "x86_64"))
    assert done.returncode == 0, done.stderr
    assert "dda double: inv system-probe.build-usm-debugger --arch=x86_64" in done.stderr
    assert "build done" in done.stderr
    record = json.loads((tmp_path / "build.json").read_text())
    binary = agent / "bin/usm-debugger"
    assert record["binary"] == str(binary)
    assert record["size"] == binary.stat().st_size
    assert record["sha256"] == hashlib.sha256(binary.read_bytes()).hexdigest()
    assert record["arch"] == "x86_64"
    assert record["clean"] is False
    assert (agent / "pkg/ebpf/bytecode/build/x86_64/usm-debug.o").exists()


def test_clean_removes_stale_ebpf_objects_first(sshd_server, agent, tmp_path):
    done = run_usmlab(*build_args(sshd_server, agent, tmp_path, "--arch", "x86_64", "--clean"))
    assert done.returncode == 0, done.stderr
    assert not (agent / "pkg/ebpf/bytecode/build/x86_64").exists()
    assert "objects:" not in done.stderr
    assert json.loads((tmp_path / "build.json").read_text())["clean"] is True


def test_a_failed_build_shows_the_compiler_error_and_exits_non_zero(sshd_server, agent, tmp_path):
    (agent / "FAIL").write_text("")
    done = run_usmlab(*build_args(sshd_server, agent, tmp_path, "--arch", "arm64"))
    assert done.returncode == EXIT_FAILED
    assert "undefined: cleaners" in done.stderr
    assert "build failed (exit 1)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "build.json").exists()


def test_missing_checkout_and_bad_arch_are_one_line_errors(sshd_server, tmp_path):
    done = run_usmlab(
        "build", "--target", sshd_server.spec, "--identity", str(sshd_server.key_path),
        "--agent-dir", str(tmp_path / "nowhere"),
    )  # fmt: skip
    assert done.returncode == EXIT_FAILED
    assert "no datadog-agent checkout" in done.stderr
    bad = run_usmlab("build", "--arch", "sparc", "--target", "local")
    assert bad.returncode == 2
    assert "unknown arch" in bad.stderr


def test_a_target_without_dda_is_a_one_line_error_with_the_way_to_get_it(sshd_server, tmp_path):
    """The lab VM's test profile has no dda: say so before streaming a failed build."""
    checkout = tmp_path / "datadog-agent"
    checkout.mkdir()
    done = run_usmlab(*build_args(sshd_server, checkout, tmp_path))
    assert done.returncode == EXIT_FAILED
    assert "dda is not installed on the target" in done.stderr
    assert "usmlab up --profile full" in done.stderr
    assert "Traceback" not in done.stderr and "build: dda inv" not in done.stderr
