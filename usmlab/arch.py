"""The one mapping between the spellings of a CPU architecture.

The same machine is `x86_64`/`aarch64` to the kernel (`uname -m`), `amd64`/`arm64` to Go,
Debian and Vagrant, and `x86_64`/`arm64` to dda's `--arch`. Every module asks here.
"""

from __future__ import annotations

from dataclasses import dataclass

from usmlab.errors import EXIT_USAGE, UsmlabError


@dataclass(frozen=True)
class Arch:
    go: str  # GOARCH; also Debian's and Vagrant's box_architecture spelling
    kernel: str  # what `uname -m` prints
    dda: str  # what `dda inv system-probe.build-usm-debugger --arch` takes


AMD64 = Arch(go="amd64", kernel="x86_64", dda="x86_64")
ARM64 = Arch(go="arm64", kernel="aarch64", dda="arm64")
_BY_NAME = {
    "amd64": AMD64, "x86_64": AMD64, "x86-64": AMD64, "x64": AMD64,
    "arm64": ARM64, "aarch64": ARM64,
}  # fmt: skip
NAMES = ("arm64", "amd64")  # how the CLI and the settings spell them


def find_arch(name: object) -> Arch | None:
    """The architecture for any of its spellings, or None."""
    return _BY_NAME.get(str(name or "").strip().lower())


def require_arch(name: object, what: str = "architecture", exit_code: int = EXIT_USAGE) -> Arch:
    """The architecture for any of its spellings; a one-line error naming the supported ones."""
    arch = find_arch(name)
    if arch is None:
        supported = ", ".join(sorted(_BY_NAME))
        raise UsmlabError(f"unsupported {what} {name!r} (supported: {supported})", exit_code)
    return arch
