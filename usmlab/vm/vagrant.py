"""Drives the lab VM with Vagrant (python-vagrant): up, provision, status, SSH details, destroy.

A VM lives in a root folder: the usmlab Vagrantfile, and under .usmlab/ the JSON settings the
Vagrantfile reads (vm.json), the rendered provisioning script, Vagrant's stderr of the last command
and a record of which script the current machine was provisioned with. That record lets `up` on a
running, provisioned VM return after one `vagrant status` instead of a full `vagrant up`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import vagrant as python_vagrant

from usmlab.arch import require_arch
from usmlab.errors import UsmlabError
from usmlab.progress import Phase, Progress, Reporter, as_reporter
from usmlab.vm.box import USER_NIC_MAC, host_debian_arch
from usmlab.vm.provision import ProvisionScript, render_provision, write_provision
from usmlab.vm.settings import AGENT_MOUNT, VmSettings, resolved_agent_path

VAGRANTFILE = Path(__file__).resolve().parents[2] / "Vagrantfile"
VAGRANTFILE_MARKER = "# The usmlab VM."
STATE_DIR = ".usmlab"
PROVISIONER = "usmlab"
MACHINE = "default"
STDERR_TAIL_LINES = 15

# What `vagrant up` says on its way, in order (Vagrant's and vagrant-libvirt's own messages):
# each begins a step of the "VM boot" bar. A restart skips some; steps never go back.
BOOT_STEPS = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("bringing the machine up", r"Bringing machine"),
        ("box volume", r"Checking if volume|Uploading base box|Creating image \(snapshot"),
        ("domain", r"Creating domain with|Updating domain definition"),
        ("starting the domain", r"Starting domain|Domain launching"),
        ("waiting for its address", r"Waiting for domain to get an IP"),
        ("booting", r"Waiting for machine to boot|Waiting for SSH"),
        ("booted", r"Machine booted and ready|Machine is booted"),
        ("network and folders", r"Setting hostname|Configuring and enabling|Rsyncing folder"),
    )
)
# provision/provision.sh.j2 numbers its steps: "[usmlab] step 3/9: bpftool".
PROVISION_STEP = re.compile(r"\[usmlab\] step (\d+)/(\d+): (.+)$")
PROVISION_DONE = re.compile(r"\[usmlab\] done: ")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS_BAR = re.compile(r"^Progress: \d+%$")
_BACKTRACE = re.compile(r"^\s+from \S+:\d+:in ")
_RUBY_LOCATION = re.compile(r"^/\S+\.rb:\d+:in `[^']*': ")


class VagrantError(UsmlabError):
    """A Vagrant command failed or Vagrant is missing; the message sums up its stderr."""


@dataclass(frozen=True)
class VmPaths:
    """Where a VM root keeps its files."""

    root: Path

    @property
    def vagrantfile(self) -> Path:
        return self.root / "Vagrantfile"

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def settings_json(self) -> Path:
        return self.state_dir / "vm.json"

    @property
    def remembered_json(self) -> Path:
        return self.state_dir / "settings.json"

    @property
    def provision_dir(self) -> Path:
        return self.state_dir / "provision"

    @property
    def provisioned_json(self) -> Path:
        return self.state_dir / "provisioned.json"

    @property
    def stderr_log(self) -> Path:
        return self.state_dir / "vagrant-stderr.log"

    @property
    def output_log(self) -> Path:
        return self.state_dir / "vagrant-output.log"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def machines_dir(self) -> Path:
        return self.root / ".vagrant" / "machines" / MACHINE


@dataclass
class UpResult:
    """What `up` did: created, started, provisioned or nothing (already running)."""

    action: str  # "created", "started", "provisioned", "already-running"
    provisioned: bool
    seconds: float
    provision_lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- preparing the root folder


def prepare(root: Path, settings: VmSettings, cwd: Path | None = None) -> ProvisionScript:
    """Write the Vagrantfile, vm.json and the provisioning script into root; returns the script."""
    paths = VmPaths(root.resolve())
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    _install_vagrantfile(paths)
    script = render_provision(settings, cwd or Path.cwd())
    script_path = write_provision(script, paths.provision_dir)
    config = vagrant_config(settings, cwd or Path.cwd(), script_path, paths)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if not paths.settings_json.exists() or paths.settings_json.read_text() != text:
        paths.settings_json.write_text(text)
    return script


def _install_vagrantfile(paths: VmPaths) -> None:
    """Put the usmlab Vagrantfile in root, refusing to replace somebody else's."""
    source = VAGRANTFILE.read_text()
    if paths.vagrantfile.exists():
        current = paths.vagrantfile.read_text()
        if current == source:
            return
        if VAGRANTFILE_MARKER not in current:
            raise VagrantError(f"{paths.vagrantfile} exists and is not the usmlab Vagrantfile")
    paths.vagrantfile.write_text(source)


def vagrant_config(
    settings: VmSettings, cwd: Path, script_path: Path | None, paths: VmPaths
) -> dict[str, object]:
    """The JSON document the Vagrantfile reads."""
    checkout = resolved_agent_path(settings, cwd)
    config: dict[str, object] = {
        "box": settings.box,
        "box_url": settings.box_url,
        "box_version": settings.box_version,
        "box_architecture": settings.box_architecture,
        "provider": settings.provider,
        "cpus": settings.cpus,
        "memory": settings.memory,
        "hostname": settings.hostname,
        "agent_path": str(checkout) if checkout else "",
        "agent_mount": AGENT_MOUNT,
        "agent_sync_type": settings.agent_sync_type,
        "provision": [{"name": PROVISIONER, "path": str(script_path)}] if script_path else [],
    }
    if settings.lab_mode:
        ssh_port, udp_port = _lab_ports(settings, paths)
        config["lab"] = {
            "kernel": settings.lab_kernel,
            "initrd": settings.lab_initrd,
            "cmd_line": settings.lab_cmdline,
            # QEMU's name for it (x86_64, aarch64): the Vagrantfile picks the machine by it.
            "arch": require_arch(settings.lab_arch or host_debian_arch()).kernel,
            "ssh_port": ssh_port,
            "udp_port": udp_port,
            "console_log": str(paths.console_log),
            "user_nic_mac": USER_NIC_MAC,
        }
    return config


def _lab_ports(settings: VmSettings, paths: VmPaths) -> tuple[int, int]:
    """Ports on 127.0.0.1 for SSH and the UDP tunnel.

    An existing machine keeps the ones it was created with: they are baked into its domain.
    """
    previous: dict[str, object] = {}
    if paths.settings_json.exists() and _machine_id(paths) is not None:
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(paths.settings_json.read_text()).get("lab") or {}
    ssh_port = int(previous.get("ssh_port") or 0) or settings.lab_ssh_port or _free_port("tcp")
    udp_port = int(previous.get("udp_port") or 0) or settings.lab_udp_port or _free_udp_pair()
    return ssh_port, udp_port


def _free_port(kind: str) -> int:
    family_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, family_type) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_udp_pair() -> int:
    """A UDP port p with p+1 also free (the tunnel's two ends)."""
    for _ in range(50):
        port = _free_port("udp")
        if port < 65535:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                try:
                    other.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise VagrantError("no pair of free UDP ports on 127.0.0.1 for the VM's tunnel NIC")


# ---------------------------------------------------------------- running Vagrant


def _vagrant_env(paths: VmPaths) -> dict[str, str]:
    return {
        **os.environ,
        "USMLAB_VM_SETTINGS": str(paths.settings_json),
        # No version check against checkpoint.hashicorp.com: the lab talks to nothing unasked.
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
    }


def _client(paths: VmPaths) -> python_vagrant.Vagrant:
    if shutil.which("vagrant") is None:
        raise VagrantError(
            "vagrant not found: install Vagrant (https://developer.hashicorp.com/vagrant)"
        )
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    return python_vagrant.Vagrant(
        str(paths.root),
        env=_vagrant_env(paths),
        err_cm=python_vagrant.make_file_cm(str(paths.stderr_log), mode="w"),
        quiet_stdout=True,
    )


def _failure(
    paths: VmPaths, what: str, exc: subprocess.CalledProcessError, progress: Progress
) -> VagrantError:
    """Show the tail of Vagrant's stderr; return a one-line error with its cause and a next
    step. With --machine-readable (status), the cause is only on stdout (`error-exit`)."""
    try:
        text = paths.stderr_log.read_text(errors="replace")
    except OSError:
        text = ""
    for line in readable_stderr(text)[-STDERR_TAIL_LINES:]:
        progress(f"vagrant: {line}")
    output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
    kind, message = machine_readable_error(output or "")
    summary = summarize_stderr(text) or summarize_stderr(message) or f"exit status {exc.returncode}"
    step = next_step(kind, summary + " " + text)
    return VagrantError(
        f"vagrant {what} failed (exit {exc.returncode}): {summary}"
        + (f"; {step}" if step else f" (stderr: {paths.stderr_log})")
    )


def machine_readable_error(output: str) -> tuple[str, str]:
    """(error class, message) of Vagrant's `--machine-readable` `error-exit` line, or ("", "")."""
    for line in output.splitlines():
        parts = line.split(",", 4)
        if len(parts) == 5 and parts[2] == "error-exit":
            message = parts[4].replace("%!(VAGRANT_COMMA)", ",").replace("\\n", "\n")
            return parts[3], message
    return "", ""


def next_step(kind: str, text: str) -> str:
    """What to do about the usual first errors (a user new to the lab VM meets these)."""
    if "ProviderNotFound" in kind or ("could not be found" in text and "provider" in text):
        found = re.search(r"provider '([\w-]+)'", text)
        name = found.group(1) if found else "PROVIDER"
        if name == "libvirt":
            plugin = "apt-get install vagrant-libvirt (or vagrant plugin install vagrant-libvirt)"
        else:
            plugin = f"vagrant plugin install vagrant-{name}"
        return f"install the provider's plugin: {plugin}, or choose another with --provider"
    if "libvirt-sock" in text or "libvirtd" in text:
        return (
            "libvirtd is not running: start `virtlogd -d` and `libvirtd -d` "
            "(`usmlab up --lab` does)"
        )
    if "dnsmasq" in text:
        return "a host tool is missing: apt-get install dnsmasq-base"
    if (
        "Could not resolve host" in text
        or "BoxNotFound" in kind
        or ("box" in text.lower() and ("could not be found" in text or "download" in text.lower()))
    ):
        return (
            "no box reachable (offline?): `usmlab up --lab` builds a local one, or --box NAME of "
            "a box already added (`vagrant box list`)"
        )
    return ""


def readable_stderr(text: str) -> list[str]:
    """Vagrant's stderr without blank lines and Ruby backtrace frames."""
    lines = [_RUBY_LOCATION.sub("", ln.rstrip()) for ln in text.splitlines()]
    return [ln for ln in lines if ln.strip() and not _BACKTRACE.match(ln)]


def summarize_stderr(text: str, limit: int = 240) -> str:
    """The first sentence of Vagrant's stderr, on one line.

    Vagrant's messages open with what went wrong ("Timed out while waiting for the machine to
    boot.") and continue with paragraphs of advice; an exception shows as its message line.
    """
    paragraph: list[str] = []
    for line in text.splitlines():
        if _BACKTRACE.match(line):
            continue
        if line.strip():
            paragraph.append(_RUBY_LOCATION.sub("", line.strip()))
        elif paragraph:
            break
    joined = " ".join(paragraph)
    end = joined.find(". ")
    sentence = joined[: end + 1] if end >= 0 else joined
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _stream(
    paths: VmPaths, what: str, lines: Iterator[str], reporter: Reporter, started: float
) -> list[str]:
    """Relay Vagrant's output with elapsed time, as a "VM boot" phase then a "provisioning"
    one; returns the provisioning script's own lines."""
    ours = []
    try:
        with paths.output_log.open("a") as log, contextlib.ExitStack() as current:
            log.write(f"=== vagrant {what} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            phase: Phase = current.enter_context(
                reporter.phase("VM boot", total=len(BOOT_STEPS))
                if what == "up"
                else reporter.phase("provisioning")
            )
            for raw in lines:
                for line in _readable(raw):
                    log.write(line + "\n")
                    text = f"[vm {time.monotonic() - started:4.0f}s] {line}"
                    provision_step = PROVISION_STEP.search(line)
                    if provision_step and phase.what != "provisioning":
                        phase.finish()
                        current.close()
                        phase = current.enter_context(reporter.phase("provisioning"))
                    if provision_step:
                        number, total = int(provision_step[1]), int(provision_step[2])
                        phase.line(text, step=number, total=total)
                    elif phase.what == "VM boot":
                        phase.line(text, step=_boot_step(line))
                    else:
                        phase.line(text)
                    if PROVISION_DONE.search(line):
                        phase.finish()
                    mark = line.find("[usmlab]")
                    if mark >= 0:
                        ours.append(line[mark:])
                log.flush()
            if phase.what == "VM boot":
                phase.finish("booted")
    except subprocess.CalledProcessError as exc:
        raise _failure(paths, what, exc, reporter.say) from None
    return ours


def _boot_step(line: str) -> int | None:
    for number, (_, pattern) in enumerate(BOOT_STEPS, 1):
        if pattern.search(line):
            return number
    return None


def _readable(raw: str) -> list[str]:
    """Split one output line into what a log should show.

    Vagrant repaints its upload progress with carriage returns and terminal escapes on a single
    line; keep the bar's final value and the text after it.
    """
    segments = [s.rstrip() for s in _ANSI.sub("\r", raw.rstrip("\n")).split("\r")]
    bars = [s.strip() for s in segments if _PROGRESS_BAR.match(s.strip())]
    text = [s for s in segments if s.strip() and not _PROGRESS_BAR.match(s.strip())]
    return bars[-1:] + text


def _call(paths: VmPaths, what: str, action: Callable[[], object], progress: Progress) -> object:
    try:
        return action()
    except subprocess.CalledProcessError as exc:
        raise _failure(paths, what, exc, progress) from None


def status(root: Path) -> str:
    """Vagrant's state of the machine: not_created, running, shutoff, poweroff, ..."""
    paths = VmPaths(root.resolve())
    if not paths.vagrantfile.exists():
        return "not_created"
    client = _client(paths)
    found = _call(paths, "status", lambda: client.status(), _quiet)
    states = [s.state for s in found]  # type: ignore[attr-defined]
    return states[0] if states and states[0] else "unknown"


def vm_exists(root: Path) -> bool:
    """Whether Vagrant has a machine for this root (any state but not_created)."""
    paths = VmPaths(root.resolve())
    if _machine_id(paths) is None:
        return False  # Vagrant keeps an id file for every created machine: no need to ask it
    return status(root) != "not_created"


def _machine_id(paths: VmPaths) -> str | None:
    for id_file in sorted(paths.machines_dir.glob("*/id")):
        text = id_file.read_text().strip()
        if text:
            return text
    return None


def _quiet(_: str) -> None:
    """Progress sink for commands whose output is data, not progress."""


def _provision_record(paths: VmPaths) -> dict[str, str]:
    try:
        return json.loads(paths.provisioned_json.read_text())
    except (OSError, ValueError):
        return {}


def is_provisioned(root: Path, script: ProvisionScript) -> bool:
    """Whether the current machine already ran exactly this provisioning script successfully."""
    paths = VmPaths(root.resolve())
    record = _provision_record(paths)
    machine = _machine_id(paths)
    return (
        machine is not None
        and record.get("machine_id") == machine
        and record.get("script_sha256") == script.sha256
    )


def _record_provisioned(paths: VmPaths, script: ProvisionScript, settings: VmSettings) -> None:
    record = {
        "machine_id": _machine_id(paths) or "",
        "script_sha256": script.sha256,
        "profile": settings.profile,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    paths.provisioned_json.write_text(json.dumps(record, indent=2) + "\n")


def up(
    root: Path,
    settings: VmSettings,
    progress: Progress | Reporter = print,
    cwd: Path | None = None,
) -> UpResult:
    """Create/start the VM and provision it when needed; a running provisioned VM is left alone."""
    started = time.monotonic()
    reporter = as_reporter(progress)
    progress = reporter.say
    paths = VmPaths(root.resolve())
    script = prepare(paths.root, settings, cwd)
    state = status(paths.root)
    needs_provision = not is_provisioned(paths.root, script)
    if state == "running" and not needs_provision:
        seconds = time.monotonic() - started
        progress(f"[vm] already running and provisioned ({seconds:.1f}s)")
        return UpResult("already-running", False, seconds)
    client = _client(paths)
    if state == "running":
        progress("[vm] running; provisioning (new script, or never ran on this machine)")
        action, ours = "provisioned", _run_provisioner(paths, client, reporter, started)
    else:
        if state == "not_created":
            action = "created"
            provider = settings.provider or "Vagrant's default provider"
            progress(f"[vm] creating the VM ({settings.box} on {provider})")
        else:
            action = "started"
            progress(f"[vm] starting the VM (was {state})")
        lines = client.up(
            provider=settings.provider or None, provision=needs_provision, stream_output=True
        )
        ours = _stream(paths, "up", lines, reporter, started)
    if needs_provision:
        _record_provisioned(paths, script, settings)
    remember(paths.root, settings)
    seconds = time.monotonic() - started
    progress(f"[vm] {action} in {seconds:.0f}s")
    return UpResult(action, needs_provision, seconds, ours)


def remember(root: Path, settings: VmSettings) -> None:
    """Keep the settings the VM was made with: every later verb uses them (docs/vm.md)."""
    paths = VmPaths(root.resolve())
    data = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
            if f.name != "sources"}  # fmt: skip
    paths.remembered_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remembered(root: Path) -> VmSettings | None:
    """The settings this folder's VM was made with, while it exists."""
    paths = VmPaths(root.resolve())
    if _machine_id(paths) is None or not paths.remembered_json.exists():
        return None
    try:
        data = json.loads(paths.remembered_json.read_text())
        return VmSettings(**data)
    except (OSError, ValueError, TypeError):
        return None


def provision(
    root: Path,
    settings: VmSettings,
    progress: Progress | Reporter = print,
    cwd: Path | None = None,
) -> UpResult:
    """Run the provisioning script again on the running VM (it changes nothing on a ready VM)."""
    started = time.monotonic()
    reporter = as_reporter(progress)
    paths = VmPaths(root.resolve())
    script = prepare(paths.root, settings, cwd)
    if status(paths.root) != "running":
        raise VagrantError("the VM is not running: run `usmlab up` first")
    ours = _run_provisioner(paths, _client(paths), reporter, started)
    _record_provisioned(paths, script, settings)
    seconds = time.monotonic() - started
    reporter.say(f"[vm] provisioned in {seconds:.0f}s")
    return UpResult("provisioned", True, seconds, ours)


def _run_provisioner(
    paths: VmPaths, client: python_vagrant.Vagrant, reporter: Reporter, started: float
) -> list[str]:
    """`vagrant provision`, streamed.

    Not `vagrant up --provision`: on a running libvirt machine that runs the provisioners twice
    (vagrant-libvirt 0.11). python-vagrant's provision() cannot stream, so its streaming helper
    is used directly.
    """
    lines = client._stream_vagrant_command(["provision", "--provision-with", PROVISIONER])
    return _stream(paths, "provision", lines, reporter, started)


def halt(root: Path, progress: Progress = print) -> None:
    paths = VmPaths(root.resolve())
    if not vm_exists(paths.root):
        progress("[vm] no VM to halt")
        return
    client = _client(paths)
    _call(paths, "halt", lambda: client.halt(), progress)
    progress("[vm] halted")


def destroy(root: Path, progress: Progress = print) -> None:
    """Delete the VM and its provisioning record (the box stays cached)."""
    paths = VmPaths(root.resolve())
    if _machine_id(paths) is None:
        progress("[vm] no VM to destroy")
        return
    client = _client(paths)
    _call(paths, "destroy", lambda: client.destroy(), progress)
    paths.provisioned_json.unlink(missing_ok=True)
    progress("[vm] destroyed")


# ---------------------------------------------------------------- SSH


def ssh_details(root: Path) -> dict[str, object]:
    """host, port, user and identity_file for plain SSH into the VM (from `vagrant ssh-config`).

    identity_file is the first key that exists; identity_files lists every key Vagrant offers
    (python-vagrant keeps only the last one).
    """
    paths = VmPaths(root.resolve())
    if not paths.vagrantfile.exists():
        raise VagrantError(f"no VM in {paths.root}: run `usmlab up` first")
    client = _client(paths)
    text = _call(paths, "ssh-config", lambda: client.ssh_config(), _quiet)
    return parse_ssh_config(str(text))


def parse_ssh_config(text: str) -> dict[str, object]:
    """The connection fields of one `vagrant ssh-config` host block."""
    options: dict[str, str] = {}
    identities: list[str] = []
    for raw in text.splitlines():
        parts = raw.strip().split(None, 1)
        if len(parts) != 2:
            continue
        key, value = parts[0].lower(), _unquote(parts[1].strip())
        if key == "identityfile":
            identities.append(value)
        else:
            options.setdefault(key, value)
    missing = [k for k in ("hostname", "port", "user") if k not in options]
    if missing:
        raise VagrantError(f"vagrant ssh-config gave no {missing[0]}: is the VM running?")
    existing = [p for p in identities if Path(p).is_file()]
    return {
        "host": options["hostname"],
        "port": int(options["port"]),
        "user": options["user"],
        "identity_file": (existing or identities or [None])[0],
        "identity_files": identities,
    }


def _unquote(value: str) -> str:
    match = re.fullmatch(r'"(.*)"', value)
    return match.group(1) if match else value
