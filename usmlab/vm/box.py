"""Builds the small local libvirt box that the VM tests boot under software emulation.

No box can be downloaded on a lab machine without internet, and a stock cloud image boots far too
slowly under TCG. A debootstrap'ed Debian with sshd, python3 and bpftrace boots in about 20 s and is
enough to run the lab's built-in tracer inside a VM. The image has no bootloader: the Vagrantfile
boots its kernel directly (lab mode), so the kernel and initrd are kept next to the box file.
The box uses the host's architecture unless asked for another: an arm64 box on an x86_64 machine
is built through qemu-user (binfmt.py) and boots under qemu-system-aarch64, several times slower
than a native-architecture guest under TCG (docs/vm.md, "arm64").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from usmlab.arch import find_arch, require_arch
from usmlab.errors import UsmlabError
from usmlab.progress import Phase, Progress, Reporter, as_reporter
from usmlab.vm.binfmt import foreign_binaries

# Bump when the build steps change in a way the recipe below does not capture.
RECIPE_VERSION = 1
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_CACHE_DIR = Path("/var/cache/usmlab/box")
IMAGE_SIZE_GB = 4
# console= sends boot messages to the serial log the lab Vagrantfile keeps (the PC UART on x86_64,
# the PL011 of QEMU's arm "virt" machine on arm64); mitigations=off because speculative-execution
# defences only slow an emulated CPU down.
KERNEL_CMDLINE = (
    "root=/dev/vda rw console={console} net.ifnames=0 systemd.show_status=0 mitigations=off"
)
SERIAL_CONSOLE = {"amd64": "ttyS0", "arm64": "ttyAMA0"}
# The MAC of the guest's user-mode NIC (set by the lab Vagrantfile), and the addresses QEMU's
# user-mode network expects: the guest is 10.0.2.15, where SSH is forwarded from 127.0.0.1.
USER_NIC_MAC = "52:54:00:12:34:56"
USER_NIC_ADDRESS = "10.0.2.15/24"
# vagrant-libvirt asks the guest agent for the address of the first libvirt-managed NIC (the UDP
# tunnel, which leads nowhere but 127.0.0.1) and waits until it has one: give it a link-local one.
TUNNEL_NIC_ADDRESS = "169.254.77.2/16"
# Driver folders a VM on QEMU never uses; dropping them halves the image (the initrd is already
# built with exactly what the boot needs, see INITRD_MODULES).
UNUSED_MODULE_DIRS = (
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/iio",
    "drivers/usb",
    "drivers/hwmon",
    "drivers/bluetooth",
    "drivers/isdn",
    "drivers/mmc",
    "drivers/nfc",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# Units that only slow an emulated boot down or reach for the network at random times.
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "e2scrub_reap.service",
    "getty-static.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)
BOX_FILE = "usmlab-test.box"

# What the in-VM lab needs and nothing else: sshd and sudo for Vagrant, the guest agent for
# vagrant-libvirt's address lookup, python3 + bpftrace + bpftool for the built-in tracer run inside
# the VM, procps for process checks, rsync/curl for synced folders and provisioning.
PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-{arch}",
    "openssh-server",
    "sudo",
    "iproute2",
    "ca-certificates",
    "qemu-guest-agent",
    "python3",
    "procps",
    "bpftrace",
    "bpftool",
    "rsync",
    "curl",
)

# Vagrant's well-known insecure public key, read from the installed Vagrant (Vagrant replaces it
# with a fresh key pair on first boot).
INSECURE_KEY_GLOBS = (
    "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub",
    "/usr/lib/ruby/vendor_ruby/vagrant/keys/vagrant.pub",
    "/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub",
    "/opt/vagrant/embedded/gems/*/gems/vagrant-*/keys/vagrant.pub",
)

# The steps of a box build, for its progress bar.
BUILD_STEPS = ("debootstrap", "configuring the guest", "disk image", "packing the box")


class BoxBuildError(UsmlabError):
    """Building the local test box failed; the message names the step and the log."""


@dataclass(frozen=True)
class TestBox:
    """A built box plus the direct-boot files the lab Vagrantfile needs."""

    name: str
    box_file: Path
    kernel: Path
    initrd: Path
    cmd_line: str
    arch: str

    @property
    def url(self) -> str:
        return self.box_file.resolve().as_uri()

    def lab_settings(self) -> dict[str, object]:
        """The settings overrides that make the Vagrantfile boot this box (see settings.py)."""
        return {
            "provider": "libvirt",
            "box": self.name,
            "box_url": self.url,
            "box_architecture": "",
            "lab_mode": True,
            "hostname": "",
            "lab_kernel": str(self.kernel),
            "lab_initrd": str(self.initrd),
            "lab_cmdline": self.cmd_line,
            "lab_arch": self.arch,
        }


def host_debian_arch() -> str:
    """The Debian name of this machine's architecture (amd64, arm64)."""
    arch = find_arch(platform.machine())
    return arch.go if arch else platform.machine().lower()


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt is configured with, so debootstrap goes where apt already goes."""
    files = [apt_dir / "sources.list"]
    for pattern in ("*.list", "*.sources"):
        files.extend(sorted((apt_dir / "sources.list.d").glob(pattern)))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url in _source_urls(text):
            if "security" not in url and url.rstrip("/").endswith("/debian"):
                return url.rstrip("/")
    return DEFAULT_MIRROR


def _source_urls(text: str) -> Iterator[str]:
    """Mirror URLs from one-line (`deb URL suite`) or deb822 (`URIs: URL`) apt sources."""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("URIs:"):
            yield from line.split()[1:]
        elif line.startswith("deb "):
            words = [w for w in line.split()[1:] if not w.startswith("[")]
            if words and "://" in words[0]:
                yield words[0]


def insecure_public_key() -> str:
    for pattern in INSECURE_KEY_GLOBS:
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            return path.read_text().strip()
    raise BoxBuildError("cannot find Vagrant's insecure public key: is vagrant installed?")


def guest_files(public_key: str) -> dict[str, tuple[str, int]]:
    """Files written into the guest (path -> content, mode)."""
    return {
        "/etc/hostname": ("usmlab-test\n", 0o644),
        "/etc/hosts": ("127.0.0.1 localhost\n127.0.1.1 usmlab-test\n::1 localhost\n", 0o644),
        "/etc/fstab": ("/dev/vda / ext4 rw,errors=remount-ro 0 1\n", 0o644),
        # Static addresses: no DHCP, nothing to wait for.
        "/etc/systemd/network/10-usmlab-user.network": (
            f"[Match]\nMACAddress={USER_NIC_MAC}\n\n[Network]\nAddress={USER_NIC_ADDRESS}\n"
            "Gateway=10.0.2.2\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
            0o644,
        ),
        "/etc/systemd/network/20-usmlab-tunnel.network": (
            f"[Match]\nName=eth*\n\n[Network]\nAddress={TUNNEL_NIC_ADDRESS}\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n",
            0o644,
        ),
        "/etc/sudoers.d/vagrant": ("vagrant ALL=(ALL) NOPASSWD:ALL\n", 0o440),
        # The guest has no DNS (user-mode networking is restricted): never wait for one, or
        # every sudo spends 20 s resolving the host name.
        "/etc/nsswitch.conf": (
            "passwd: files\ngroup: files\nshadow: files\ngshadow: files\nhosts: files\n"
            "networks: files\nprotocols: files\nservices: files\nethers: files\nrpc: files\n",
            0o644,
        ),
        # debootstrap copies the build host's resolver; the guest has none.
        "/etc/resolv.conf": ("# usmlab test box: no DNS\n", 0o644),
        "/etc/ssh/sshd_config.d/usmlab.conf": ("UseDNS no\n", 0o644),
        "/home/vagrant/.ssh/authorized_keys": (public_key + "\n", 0o600),
    }


def initrd_files() -> dict[str, tuple[str, int]]:
    """Written before debootstrap, so the kernel's own postinst builds a small initrd.

    MODULES=list takes only the modules named in modules.d: a 6 MB initrd instead of 36 MB,
    quicker to build and to unpack under emulation. (/etc/initramfs-tools/modules is a conffile
    of initramfs-tools; the modules.d folder is not, so dpkg never asks about it.)
    """
    return {
        "/etc/initramfs-tools/conf.d/usmlab.conf": ("MODULES=list\n", 0o644),
        "/usr/share/initramfs-tools/modules.d/usmlab": ("\n".join(INITRD_MODULES) + "\n", 0o644),
    }


def recipe(arch: str, public_key: str) -> dict[str, object]:
    """Everything that decides the box's content; its hash names the cache entry."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "arch": arch,
        "packages": [p.format(arch=arch) for p in PACKAGES],
        "files": guest_files(public_key),
        "initrd_files": initrd_files(),
        "image_size_gb": IMAGE_SIZE_GB,
        "cmd_line": kernel_cmdline(arch),
        "unused_module_dirs": UNUSED_MODULE_DIRS,
        "masked_units": MASKED_UNITS,
        "ssh": "socket-activated",
    }


def kernel_cmdline(arch: str) -> str:
    return KERNEL_CMDLINE.format(console=SERIAL_CONSOLE.get(arch, "ttyS0"))


def recipe_key(spec: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("USMLAB_BOX_CACHE") or DEFAULT_CACHE_DIR)


def cached_test_box(cache_dir: Path, key: str) -> TestBox | None:
    """The box built earlier for this recipe, if its build finished."""
    marker = cache_dir / key / "box.json"
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text())
    box = TestBox(
        name=data["name"],
        box_file=Path(data["box_file"]),
        kernel=Path(data["kernel"]),
        initrd=Path(data["initrd"]),
        cmd_line=data["cmd_line"],
        arch=data["arch"],
    )
    if all(p.is_file() for p in (box.box_file, box.kernel, box.initrd)):
        return box
    return None


def build_test_box(
    cache_dir: Path | None = None,
    progress: Progress | Reporter = print,
    mirror: str | None = None,
    arch: str | None = None,
) -> TestBox:
    """Return the test box for arch (default: this machine's), building it unless cached.

    The build takes 2-3 min natively, about 6 min for arm64 through qemu-user.
    """
    cache_dir = cache_dir or default_cache_dir()
    arch = require_arch(arch).go if arch else host_debian_arch()
    spec = recipe(arch, insecure_public_key())
    key = recipe_key(spec)
    found = cached_test_box(cache_dir, key)
    if found is not None:
        as_reporter(progress).say(f"[box] {found.name}: cached in {found.box_file.parent}")
        return found
    _require_build_tools()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_dir):
        found = cached_test_box(cache_dir, key)  # another process may have built it meanwhile
        if found is not None:
            return found
        reporter = as_reporter(progress)
        with reporter.phase("box build", total=len(BUILD_STEPS), every=15.0) as phase:
            box = _build(cache_dir, key, spec, mirror or apt_mirror(), phase)
            phase.finish(f"{box.name} ready in {box.box_file.parent}")
        prune_stale_boxes(box, cache_dir, reporter.say)
        return box


BOX_PREFIX = "usmlab-test-"


def prune_stale_boxes(current: TestBox, cache_dir: Path, progress: Progress = print) -> None:
    """Remove test boxes of older recipes for current's architecture: cache folders, Vagrant
    boxes, libvirt volumes. The other architecture's box stays (both are used side by side).

    Only names this module creates (usmlab-test-*) are touched, a Vagrant box or volume is
    removed only when no cached box has its name, and one a machine still uses is kept (Vagrant
    refuses to remove a box in use without --force).
    """
    kept = prune_stale_cache(current, cache_dir, progress)
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}
    if shutil.which("vagrant"):
        listed = subprocess.run(
            ["vagrant", "box", "list"], capture_output=True, text=True, env=env, check=False
        )
        for line in listed.stdout.splitlines():
            name = line.split(" ", 1)[0]
            if name.startswith(BOX_PREFIX) and name not in kept:
                removed = subprocess.run(
                    ["vagrant", "box", "remove", name, "--provider", "libvirt", "--all"],
                    capture_output=True,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
                if removed.returncode == 0:
                    progress(f"[box] removed stale Vagrant box {name}")
    for volume in _stale_volumes(kept):
        done = subprocess.run(["virsh", "vol-delete", volume], capture_output=True, check=False)
        if done.returncode == 0:
            progress(f"[box] removed stale libvirt volume {volume}")


def prune_stale_cache(current: TestBox, cache_dir: Path, progress: Progress = print) -> set[str]:
    """Remove cache folders of current's architecture but other recipes; return the names of
    the boxes still cached (current's and the other architecture's)."""
    kept = {current.name}
    for entry in sorted(cache_dir.iterdir()):
        if not entry.is_dir() or entry == current.box_file.parent:
            continue
        other = cached_test_box(cache_dir, entry.name)
        if other is not None and other.arch != current.arch:
            kept.add(other.name)
        elif (entry / "box.json").exists():
            shutil.rmtree(entry, ignore_errors=True)
            progress(f"[box] removed stale cache {entry}")
    return kept


def _stale_volumes(kept: set[str]) -> list[str]:
    """Paths of older test-box volumes in libvirt's default pool that no domain's disk uses."""
    if shutil.which("virsh") is None:
        return []
    listed = subprocess.run(
        ["virsh", "vol-list", "default"], capture_output=True, text=True, check=False
    )
    candidates = [
        parts[-1]
        for parts in (line.split() for line in listed.stdout.splitlines())
        if len(parts) == 2
        and parts[0].startswith(BOX_PREFIX)
        and not any(parts[0].startswith(name + "_") for name in kept)
    ]
    if not candidates:
        return []
    in_use = _backing_files_in_use()
    return [path for path in candidates if path not in in_use]


def _backing_files_in_use() -> set[str]:
    """Every file in the disk chains of every libvirt domain, running or not."""
    used: set[str] = set()
    domains = subprocess.run(
        ["virsh", "list", "--all", "--name"], capture_output=True, text=True, check=False
    ).stdout.split()
    for domain in domains:
        blocks = subprocess.run(
            ["virsh", "domblklist", domain, "--details"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in blocks.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[1] == "disk" and parts[3].startswith("/"):
                chain = subprocess.run(
                    ["qemu-img", "info", "-U", "--backing-chain", "--output=json", parts[3]],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                with contextlib.suppress(ValueError):
                    used.update(image["filename"] for image in json.loads(chain.stdout))
    return used


def require_emulator(arch: str | None) -> None:
    """The QEMU system emulator that boots arch's box (qemu-system-aarch64 for arm64)."""
    kernel_name = require_arch(arch or host_debian_arch()).kernel
    if shutil.which(f"qemu-system-{kernel_name}") is None:
        package = "qemu-system-arm" if kernel_name == "aarch64" else "qemu-system-x86"
        raise BoxBuildError(
            f"qemu-system-{kernel_name} not found, needed to boot the {kernel_name} lab VM: "
            f"apt-get install {package}"
        )


def _require_build_tools() -> None:
    if os.geteuid() != 0:
        raise BoxBuildError("building the test box needs root (debootstrap, chroot)")
    missing = [t for t in ("debootstrap", "mkfs.ext4", "qemu-img", "tar") if not shutil.which(t)]
    if missing:
        raise BoxBuildError(
            f"building the test box needs {', '.join(missing)}: "
            "apt-get install debootstrap e2fsprogs qemu-utils tar"
        )


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(
    cache_dir: Path, key: str, spec: dict[str, object], mirror: str, phase: Phase
) -> TestBox:
    final = cache_dir / key
    work = cache_dir / f"{key}.building"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "build.log"
    rootfs = work / "rootfs"
    arch = str(spec["arch"])
    started = time.monotonic()
    if arch == host_debian_arch():
        _install_guest(rootfs, log, spec, mirror, phase)
    else:
        phase.say(
            f"[box] {arch} on {host_debian_arch()}: the guest's programs run through qemu-user"
        )
        with foreign_binaries(require_arch(arch)):
            _install_guest(rootfs, log, spec, mirror, phase)
    kernel, initrd = _copy_boot_files(rootfs, work)
    _build_step(phase, "disk image", f"making the disk image ({IMAGE_SIZE_GB} GB ext4, qcow2)")
    raw = work / "root.raw"
    size = f"{IMAGE_SIZE_GB}G"
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "usmlab-root", "-d", str(rootfs), str(raw), size],
        log,
        "mkfs.ext4",
    )
    shutil.rmtree(rootfs)
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "box.img")], log, "qemu-img")
    raw.unlink()
    metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": IMAGE_SIZE_GB}
    (work / "metadata.json").write_text(json.dumps(metadata) + "\n")
    (work / "Vagrantfile").write_text(
        "# usmlab test box: boots only with the lab Vagrantfile's direct kernel boot.\n"
        'Vagrant.configure("2") do |config|\n'
        '  config.vm.provider :libvirt do |lv|\n    lv.driver = "qemu"\n  end\nend\n'
    )
    _build_step(phase, "packing the box", "packing the box")
    _run(
        ["tar", "-cf", BOX_FILE, "metadata.json", "Vagrantfile", "box.img"],
        log,
        "tar",
        cwd=work,
    )
    for name in ("box.img", "metadata.json", "Vagrantfile"):
        (work / name).unlink()
    work.rename(final)
    box = TestBox(
        name=f"usmlab-test-{key}",
        box_file=final / BOX_FILE,
        kernel=final / kernel.name,
        initrd=final / initrd.name,
        cmd_line=str(spec["cmd_line"]),
        arch=arch,
    )
    record = {
        "name": box.name,
        "box_file": str(box.box_file),
        "kernel": str(box.kernel),
        "initrd": str(box.initrd),
        "cmd_line": box.cmd_line,
        "arch": arch,
        "recipe": spec,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (final / "box.json").write_text(json.dumps(record, indent=2) + "\n")
    return box


def _install_guest(
    rootfs: Path,
    log: Path,
    spec: dict[str, object],
    mirror: str,
    phase: Phase,
) -> None:
    """debootstrap the guest's packages into rootfs, then configure it for Vagrant."""
    arch = str(spec["arch"])
    packages = [str(p) for p in spec["packages"]]  # type: ignore[attr-defined]
    native = arch == host_debian_arch()
    _build_step(
        phase,
        "debootstrap",
        f"debootstrap {SUITE} {arch} from {mirror} (about {2 if native else 6} min)",
    )
    # dpkg's fsync per file dominates the install on small machines; a throwaway build tree does
    # not need it. The setting is removed before the image is made.
    unsafe_io = rootfs / "etc/dpkg/dpkg.cfg.d/usmlab-build-unsafe-io"
    _write_files(rootfs, {str(unsafe_io.relative_to(rootfs)): ("force-unsafe-io\n", 0o644)})
    _write_files(rootfs, initrd_files())
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--arch={arch}",
            f"--include={','.join(packages)}",
            SUITE,
            str(rootfs),
            mirror,
        ],
        log,
        "debootstrap",
        heard=phase.detail,  # "I: Unpacking libc6..." says how far it is
    )
    unsafe_io.unlink()
    _build_step(
        phase,
        "configuring the guest",
        "configuring the guest (vagrant user, sshd, networkd, small initrd)",
    )
    _configure_guest(rootfs, spec["files"], log)  # type: ignore[arg-type]


def _build_step(phase: Phase, name: str, note: str) -> None:
    """Step `name` of BUILD_STEPS begins (its number is its place there)."""
    phase.step(BUILD_STEPS.index(name) + 1, note)


def _configure_guest(rootfs: Path, files: dict[str, tuple[str, int]], log: Path) -> None:
    _chroot(rootfs, ["useradd", "--create-home", "--shell", "/bin/bash", "vagrant"], log)
    _write_files(rootfs, files)
    ssh_dir = rootfs / "home/vagrant/.ssh"
    ssh_dir.chmod(0o700)
    _chroot(rootfs, ["chown", "-R", "vagrant:vagrant", "/home/vagrant"], log)
    _chroot(rootfs, ["systemctl", "enable", "systemd-networkd"], log)
    _chroot(rootfs, ["systemctl", "mask", *MASKED_UNITS], log)
    # Socket activation: sshd answers as soon as sockets are up, without waiting for the network.
    _chroot(rootfs, ["systemctl", "disable", "ssh.service"], log)
    _chroot(rootfs, ["systemctl", "enable", "ssh.socket"], log)
    _chroot(rootfs, ["systemctl", "set-default", "multi-user.target"], log)
    _trim_kernel_modules(rootfs, log)
    # An empty machine-id makes every VM generate its own on first boot.
    (rootfs / "etc/machine-id").write_text("")
    for leftover in (rootfs / "var/lib/apt/lists").glob("*_*"):
        leftover.unlink()
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _write_files(rootfs: Path, files: dict[str, tuple[str, int]]) -> None:
    for guest_path, (content, mode) in files.items():
        path = rootfs / guest_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)


def _trim_kernel_modules(rootfs: Path, log: Path) -> None:
    """Drop unused drivers and rebuild the module index."""
    for kernel_dir in sorted((rootfs / "usr/lib/modules").glob("*")):
        for sub in UNUSED_MODULE_DIRS:
            shutil.rmtree(kernel_dir / "kernel" / sub, ignore_errors=True)
        _chroot(rootfs, ["depmod", kernel_dir.name], log)


def _copy_boot_files(rootfs: Path, work: Path) -> tuple[Path, Path]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise BoxBuildError(f"debootstrap installed no kernel/initrd in {rootfs / 'boot'}")
    copies = []
    for source in (kernels[-1], initrds[-1]):
        target = work / source.name
        shutil.copyfile(source, target)
        target.chmod(0o644)  # qemu runs as libvirt-qemu and must read them
        copies.append(target)
    return copies[0], copies[1]


def _chroot(rootfs: Path, argv: list[str], log: Path) -> None:
    _run(["chroot", str(rootfs), *argv], log, argv[0])


def _run(
    argv: list[str],
    log: Path,
    what: str,
    cwd: Path | None = None,
    heard: Callable[[str], None] | None = None,
) -> None:
    """Run a build step with its output appended to the build log; fail with the log's tail.
    `heard` gets each output line as it comes (a progress detail)."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        if heard is None:
            code = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=False
            ).returncode
        else:
            with subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                text=True, errors="replace",
            ) as proc:  # fmt: skip
                assert proc.stdout is not None
                for line in proc.stdout:
                    out.write(line)
                    heard(line.strip())
            code = proc.returncode
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-1] if lines else f"exit status {code}"
        raise BoxBuildError(f"box build step {what} failed: {tail} (full log: {log})")
