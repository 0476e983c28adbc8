"""What the VM end-to-end tests need, and the one rule for a missing piece: skip on a
developer's machine, fail in CI (USMLAB_REQUIRE_VM_TESTS=1, which installed everything)."""

from __future__ import annotations

import os
import shutil

import pytest

VM_TOOLS = ("vagrant", "virsh", "libvirtd", "virtlogd", "debootstrap", "qemu-img", "ssh")


def missing_tools(*extra: str) -> list[str]:
    """The VM tools (and extra ones) not on the PATH, plus "root" when not root."""
    missing = [tool for tool in (*VM_TOOLS, *extra) if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def require(missing: list[str], what: str) -> None:
    if missing and os.environ.get("USMLAB_REQUIRE_VM_TESTS") == "1":
        pytest.fail(f"{what} required but missing: {', '.join(missing)}")
    if missing:
        pytest.skip(f"{what} need {', '.join(missing)}")
