"""The VM's settings, layered: built-in defaults < usmlab.toml < USMLAB_VM_* environment < flags.

One place decides what VM a user gets, so the CLI, the Vagrantfile (through the JSON file
that vagrant.py writes) and the tests all agree. Every value remembers which layer set it, so a
surprising VM can be explained (`box = ... (USMLAB_VM_BOX)`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usmlab.arch import NAMES as ARCH_NAMES
from usmlab.errors import UsageError

TOML_NAME = "usmlab.toml"
ENV_PREFIX = "USMLAB_VM_"
PROVIDERS = ("libvirt", "vmware_desktop", "parallels", "qemu", "virtualbox")
ARCHITECTURES = ARCH_NAMES
PROFILES = ("full", "test")
AGENT_MOUNT = "/git/datadog-agent"


@dataclass(frozen=True)
class VmSettings:
    """What VM to create and how to provision it.

    The lab_* fields describe the libvirt "lab mode" used by the tests and by machines without
    hardware virtualisation: a local box booted by direct kernel boot under TCG, with only
    user-mode networking on 127.0.0.1 (see box.py and the Vagrantfile).
    """

    box: str = "bento/ubuntu-24.04"
    box_version: str = ""
    box_url: str = ""
    # Empty: let Vagrant decide (also the only choice before Vagrant 2.4.0).
    box_architecture: str = "arm64"
    # Empty: Vagrant's own choice (VAGRANT_DEFAULT_PROVIDER, then the first usable one).
    provider: str = ""
    cpus: int = 4
    memory: int = 8192
    hostname: str = "usmlab"
    # A local datadog-agent checkout, synced to /git/datadog-agent; empty: no synced folder.
    agent_path: str = ""
    # Synced-folder type (rsync, nfs, virtiofs, ...); empty: the provider's default.
    agent_sync_type: str = ""
    # full: the whole toolchain; test: offline, heavy steps skipped (each skip is printed).
    profile: str = "full"
    # Empty: the version the agent checkout asks for in its .go-version.
    go_version: str = ""
    # Empty: the newest dda on PyPI.
    dda_version: str = ""
    # Empty: the distribution's default clang/llvm packages; "18" installs clang-18, llvm-18.
    clang_version: str = ""
    lab_mode: bool = False
    lab_kernel: str = ""
    lab_initrd: str = ""
    lab_cmdline: str = ""
    # The test box's architecture (amd64, arm64); "" = this machine's.
    lab_arch: str = ""
    # 0: pick a free port on 127.0.0.1 when the VM is created.
    lab_ssh_port: int = 0
    lab_udp_port: int = 0
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> list[str]:
        """One line per setting with the layer it came from."""
        lines = []
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            origin = self.sources.get(f.name, "default")
            lines.append(f"{f.name} = {getattr(self, f.name)!r} ({origin})")
        return lines


_FIELDS = {f.name: f for f in dataclasses.fields(VmSettings) if f.name != "sources"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def load_settings(
    cwd: Path,
    env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> VmSettings:
    """Settings from cwd/usmlab.toml, then USMLAB_VM_* variables, then flags (None = not given)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    toml_path = cwd / TOML_NAME
    for key, raw in _read_toml(toml_path).items():
        values[key] = _convert(key, raw, f"{toml_path}: vm.{key}")
        sources[key] = str(toml_path)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key == "settings":  # USMLAB_VM_SETTINGS names the JSON file for the Vagrantfile
            continue
        if key not in _FIELDS:
            raise UsageError(f"{name}: unknown VM setting (known: {', '.join(_FIELDS)})")
        values[key] = _convert(key, raw, name)
        sources[key] = name
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise UsageError(f"unknown VM setting {key!r}")
        values[key] = _convert(key, raw, f"--{key.replace('_', '-')}")
        sources[key] = "flag"
    settings = VmSettings(**values, sources=sources)
    _validate(settings, cwd)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    section = data.get("vm", {})
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [vm] must be a table")
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise UsageError(f"{path}: unknown key vm.{unknown[0]} (known: {', '.join(_FIELDS)})")
    return section


def _convert(key: str, raw: Any, origin: str) -> Any:
    """Coerce a value from TOML, the environment or a flag to the field's type."""
    kind = _FIELDS[key].type
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise UsageError(f"{origin}: expected true or false, got {raw!r}")
    if kind == "int":
        if isinstance(raw, bool):
            raise UsageError(f"{origin}: expected a whole number, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise UsageError(f"{origin}: expected a whole number, got {raw!r}") from None
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise UsageError(f"{origin}: expected a string, got {raw!r}")
    return str(raw).strip()


def _validate(s: VmSettings, cwd: Path) -> None:
    def where(key: str) -> str:
        return s.sources.get(key, "default")

    if s.provider and s.provider not in PROVIDERS:
        raise UsageError(
            f"unknown provider {s.provider!r} ({where('provider')}): use {', '.join(PROVIDERS)}"
        )
    if s.lab_arch and s.lab_arch not in ARCHITECTURES:
        raise UsageError(
            f"unknown lab architecture {s.lab_arch!r} ({where('lab_arch')}): "
            f"use {' or '.join(ARCHITECTURES)}"
        )
    if s.box_architecture and s.box_architecture not in ARCHITECTURES:
        raise UsageError(
            f"unknown box architecture {s.box_architecture!r} ({where('box_architecture')}): "
            f"use {' or '.join(ARCHITECTURES)}"
        )
    if s.profile not in PROFILES:
        raise UsageError(f"unknown profile {s.profile!r} ({where('profile')}): use full or test")
    if not s.box:
        raise UsageError(f"box must not be empty ({where('box')})")
    if s.cpus < 1:
        raise UsageError(f"cpus must be at least 1 ({where('cpus')}), got {s.cpus}")
    if s.memory < 512:
        raise UsageError(f"memory is in MB and must be at least 512 ({where('memory')})")
    for key in ("lab_ssh_port", "lab_udp_port"):
        port = getattr(s, key)
        if not 0 <= port <= 65534:
            raise UsageError(f"{key} must be a port number ({where(key)}), got {port}")
    if s.agent_path:
        checkout = (cwd / s.agent_path).expanduser()
        if not checkout.is_dir():
            raise UsageError(
                f"agent_path {s.agent_path!r} ({where('agent_path')}) is not a directory"
            )
    if s.lab_mode:
        if s.provider != "libvirt":
            raise UsageError(f"lab_mode needs provider libvirt, got {s.provider or 'none'!r}")
        for key in ("lab_kernel", "lab_initrd"):
            path = getattr(s, key)
            if not path or not Path(path).is_file():
                raise UsageError(
                    f"lab_mode needs {key} to name an existing file ({where(key)}): {path!r}"
                )


def resolved_agent_path(settings: VmSettings, cwd: Path) -> Path | None:
    """The agent checkout as an absolute path (toml paths are relative to the toml's folder)."""
    if not settings.agent_path:
        return None
    return (cwd / settings.agent_path).expanduser().resolve()


DEFAULT_TOML = f"""\
# usmlab settings. USMLAB_VM_<KEY> environment variables override the [vm] values below,
# and command-line flags override both.

[vm]
# Any Vagrant box; bento publishes arm64 builds of ubuntu-22.04 and ubuntu-24.04.
box = "{VmSettings.box}"
# arm64 or amd64 (used with Vagrant 2.4.0 and later; "" lets Vagrant decide).
box_architecture = "{VmSettings.box_architecture}"
# One of {", ".join(PROVIDERS)}; "" lets Vagrant choose.
# Apple Silicon: vmware_desktop, parallels or qemu (vagrant-qemu plugin). Linux: libvirt.
provider = "{VmSettings.provider}"
cpus = {VmSettings.cpus}
# MB
memory = {VmSettings.memory}
# Your datadog-agent checkout, synced to {AGENT_MOUNT} in the VM ("" = no synced folder).
agent_path = ""
# Synced folder type (rsync, nfs, virtiofs...; "" = the provider's default).
agent_sync_type = ""
# full: build tools, clang, Go (from the checkout's .go-version), dda, kernel headers, bpftrace.
# test: offline, skips the heavy toolchain steps.
profile = "full"
# "" = the version in the checkout's .go-version.
go_version = ""
# "" = the newest dda.
dda_version = ""
# "" = the distribution's clang/llvm; "18" installs clang-18 and llvm-18.
clang_version = ""
"""


def write_default_toml(path: Path, force: bool = False) -> Path:
    """Write a commented usmlab.toml with the defaults; never overwrite one silently."""
    if path.exists() and not force:
        raise UsageError(f"{path} already exists: edit it, or remove it to start over")
    path.write_text(DEFAULT_TOML)
    return path
