"""Fast checks of the VM layer that need no VM: the Vagrantfile, provisioning scripts, settings."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labrun import run_usmlab

from usmlab.errors import UsageError
from usmlab.progress import Phase, Reporter
from usmlab.vm import box, vagrant
from usmlab.vm.provision import read_go_version, render_provision
from usmlab.vm.settings import PROVIDERS, VmSettings, load_settings, write_default_toml

NEEDS_VAGRANT = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")
NEEDS_SHELLCHECK = pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed"
)


def lab_overrides(tmp_path: Path) -> dict[str, object]:
    """Lab-mode settings pointing at stand-in kernel/initrd files (validate never boots them)."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    return {
        "provider": "libvirt",
        "box": "usmlab-test-000000000000",
        "box_url": (tmp_path / "usmlab-test.box").as_uri(),
        "box_architecture": "",
        "hostname": "",
        "lab_mode": True,
        "lab_kernel": str(kernel),
        "lab_initrd": str(initrd),
        "lab_cmdline": box.kernel_cmdline("amd64"),
        "lab_ssh_port": 42222,
        "lab_udp_port": 42300,
        "profile": "test",
    }


def validate(root: Path, provider: str) -> subprocess.CompletedProcess[str]:
    """`vagrant validate` in root; only libvirt is installed here, so the other providers'
    blocks are checked with --ignore-provider (Vagrant refuses a provider it does not have)."""
    env = {
        **os.environ,
        "USMLAB_VM_SETTINGS": str(root / ".usmlab" / "vm.json"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
    }
    argv = ["vagrant", "validate"] if provider == "libvirt" else ["vagrant", "validate", "-p"]
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ Vagrantfile


@NEEDS_VAGRANT
@pytest.mark.parametrize("provider", PROVIDERS)
def test_vagrantfile_validates_for_each_provider(tmp_path: Path, provider: str) -> None:
    checkout = tmp_path / "datadog-agent"
    checkout.mkdir()
    (checkout / ".go-version").write_text("1.23.4\n")
    settings = load_settings(
        tmp_path,
        {},
        {"provider": provider, "agent_path": str(checkout), "agent_sync_type": "rsync"},
    )
    root = tmp_path / "vm"
    vagrant.prepare(root, settings, cwd=tmp_path)
    done = validate(root, provider)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "validated successfully" in done.stdout


@NEEDS_VAGRANT
@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_vagrantfile_validates_lab_mode_with_libvirt_options(tmp_path: Path, arch: str) -> None:
    overrides = {**lab_overrides(tmp_path), "lab_arch": arch}
    overrides["lab_cmdline"] = box.kernel_cmdline(arch)
    settings = load_settings(tmp_path, {}, overrides)
    root = tmp_path / "vm"
    vagrant.prepare(root, settings, cwd=tmp_path)
    done = validate(root, "libvirt")
    assert done.returncode == 0, done.stderr + done.stdout
    lab = json.loads((root / ".usmlab" / "vm.json").read_text())["lab"]
    assert lab["ssh_port"] == 42222 and lab["udp_port"] == 42300
    assert lab["arch"] == {"amd64": "x86_64", "arm64": "aarch64"}[arch]
    assert lab["cmd_line"].count("console=") == 1
    assert ("console=ttyAMA0" in lab["cmd_line"]) == (arch == "arm64")


@NEEDS_VAGRANT
def test_vagrantfile_rejects_a_broken_settings_file(tmp_path: Path) -> None:
    """validate must be able to fail, or the tests above prove nothing."""
    settings = load_settings(tmp_path, {}, lab_overrides(tmp_path))
    root = tmp_path / "vm"
    vagrant.prepare(root, settings, cwd=tmp_path)
    config_path = root / ".usmlab" / "vm.json"
    config = json.loads(config_path.read_text())
    del config["lab"]["kernel"]
    config_path.write_text(json.dumps(config))
    done = validate(root, "libvirt")
    assert done.returncode != 0
    assert "kernel" in done.stderr + done.stdout


@NEEDS_VAGRANT
def test_vagrantfile_without_settings_file_gives_the_defaults(tmp_path: Path) -> None:
    shutil.copyfile(vagrant.VAGRANTFILE, tmp_path / "Vagrantfile")
    done = validate(tmp_path, "libvirt")
    assert done.returncode == 0, done.stderr + done.stdout


def test_existing_machine_keeps_its_forwarded_ports(tmp_path: Path) -> None:
    """The SSH port is baked into a created domain: new settings must not move it."""
    root = tmp_path / "vm"
    vagrant.prepare(root, load_settings(tmp_path, {}, lab_overrides(tmp_path)), cwd=tmp_path)
    moved = {**lab_overrides(tmp_path), "lab_ssh_port": 43333, "lab_udp_port": 43400}

    def lab_ports() -> tuple[int, int]:
        lab = json.loads((root / ".usmlab" / "vm.json").read_text())["lab"]
        return lab["ssh_port"], lab["udp_port"]

    machine = root / ".vagrant" / "machines" / "default" / "libvirt"
    machine.mkdir(parents=True)
    (machine / "id").write_text("5b6c1f8e-1111-2222-3333-444455556666")
    vagrant.prepare(root, load_settings(tmp_path, {}, moved), cwd=tmp_path)
    assert lab_ports() == (42222, 42300)

    (machine / "id").unlink()  # destroyed: the next machine takes the new ports
    vagrant.prepare(root, load_settings(tmp_path, {}, moved), cwd=tmp_path)
    assert lab_ports() == (43333, 43400)


def test_prepare_refuses_to_replace_a_foreign_vagrantfile(tmp_path: Path) -> None:
    (tmp_path / "Vagrantfile").write_text('Vagrant.configure("2") { |c| c.vm.box = "mine" }\n')
    settings = load_settings(tmp_path, {}, {"profile": "test"})
    with pytest.raises(vagrant.VagrantError, match="not the usmlab Vagrantfile"):
        vagrant.prepare(tmp_path, settings, cwd=tmp_path)
    assert "mine" in (tmp_path / "Vagrantfile").read_text()


def test_prepare_writes_settings_and_script_for_the_vagrantfile(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, {}, {"cpus": 3, "memory": 2048, "profile": "test"})
    script = vagrant.prepare(tmp_path / "vm", settings, cwd=tmp_path)
    config = json.loads((tmp_path / "vm" / ".usmlab" / "vm.json").read_text())
    assert (config["cpus"], config["memory"], config["agent_path"]) == (3, 2048, "")
    assert "lab" not in config
    [provisioner] = config["provision"]
    assert Path(provisioner["path"]).read_text() == script.text
    assert (tmp_path / "vm" / "Vagrantfile").read_text() == vagrant.VAGRANTFILE.read_text()


# ------------------------------------------------------------------ provisioning scripts

SCRIPT_VARIANTS = [
    {"profile": "test"},
    {"profile": "full"},
    {"profile": "full", "go_version": "1.23.4", "dda_version": "0.24.0", "clang_version": "18"},
]


@pytest.mark.parametrize("overrides", SCRIPT_VARIANTS)
def test_rendered_scripts_are_valid_bash(tmp_path: Path, overrides: dict[str, str]) -> None:
    script = render_provision(load_settings(tmp_path, {}, overrides), tmp_path)
    path = tmp_path / script.name
    path.write_text(script.text)
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@NEEDS_SHELLCHECK
@pytest.mark.parametrize("overrides", SCRIPT_VARIANTS)
def test_rendered_scripts_pass_shellcheck(tmp_path: Path, overrides: dict[str, str]) -> None:
    script = render_provision(load_settings(tmp_path, {}, overrides), tmp_path)
    path = tmp_path / script.name
    path.write_text(script.text)
    done = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_go_version_comes_from_the_agent_checkout(tmp_path: Path) -> None:
    checkout = tmp_path / "datadog-agent"
    checkout.mkdir()
    (checkout / ".go-version").write_text("1.24.6\n")
    settings = load_settings(tmp_path, {}, {"agent_path": "datadog-agent"})
    text = render_provision(settings, tmp_path).text
    assert "GO_VERSION='1.24.6'\n" in text
    assert "AGENT_DIR='/git/datadog-agent'\n" in text
    pinned = load_settings(tmp_path, {}, {"agent_path": "datadog-agent", "go_version": "1.22.1"})
    assert "GO_VERSION='1.22.1'\n" in render_provision(pinned, tmp_path).text


def test_bad_go_version_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / ".go-version").write_text("latest; rm -rf /\n")
    with pytest.raises(UsageError, match="not a Go version"):
        read_go_version(tmp_path)
    with pytest.raises(UsageError, match=r"\.go-version not found"):
        read_go_version(tmp_path / "missing")


def test_test_profile_names_every_heavy_step_it_skips(tmp_path: Path) -> None:
    text = render_provision(load_settings(tmp_path, {}, {"profile": "test"}), tmp_path).text
    for step in ("go", "clang", "dda", "kernel-headers"):
        assert f"heavy {step} || return 0" in text


def test_provision_script_changes_with_its_inputs(tmp_path: Path) -> None:
    test = render_provision(load_settings(tmp_path, {}, {"profile": "test"}), tmp_path)
    full = render_provision(load_settings(tmp_path, {}, {"profile": "full"}), tmp_path)
    again = render_provision(load_settings(tmp_path, {}, {"profile": "test"}), tmp_path)
    assert test.sha256 == again.sha256
    assert test.sha256 != full.sha256


# ------------------------------------------------------------------ settings layering


def test_defaults_are_the_lab_defaults(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, {}, None)
    assert (settings.box, settings.box_architecture) == ("bento/ubuntu-24.04", "arm64")
    assert settings.sources == {}


def test_toml_then_environment_then_flags(tmp_path: Path) -> None:
    (tmp_path / "usmlab.toml").write_text(
        '[vm]\nbox = "bento/ubuntu-22.04"\ncpus = 2\nmemory = 4096\nprovider = "parallels"\n'
    )
    env = {"USMLAB_VM_CPUS": "6", "USMLAB_VM_MEMORY": "6144", "HOME": "/root"}
    settings = load_settings(tmp_path, env, {"memory": 16384, "provider": None})
    assert settings.box == "bento/ubuntu-22.04"  # toml only
    assert settings.provider == "parallels"  # flag not given (None) keeps the toml value
    assert settings.cpus == 6  # env beats toml
    assert settings.memory == 16384  # flag beats env
    assert settings.sources["box"].endswith("usmlab.toml")
    assert settings.sources["cpus"] == "USMLAB_VM_CPUS"
    assert settings.sources["memory"] == "flag"
    assert "cpus = 6 (USMLAB_VM_CPUS)" in settings.describe()


def test_environment_booleans_and_numbers_are_parsed(tmp_path: Path) -> None:
    settings = load_settings(
        tmp_path, {"USMLAB_VM_LAB_SSH_PORT": " 2222 ", "USMLAB_VM_SETTINGS": "/x/vm.json"}, {}
    )
    assert settings.lab_ssh_port == 2222
    with pytest.raises(UsageError, match="USMLAB_VM_CPUS: expected a whole number"):
        load_settings(tmp_path, {"USMLAB_VM_CPUS": "four"}, {})
    with pytest.raises(UsageError, match="expected true or false"):
        load_settings(tmp_path, {"USMLAB_VM_LAB_MODE": "maybe"}, {})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[vm]\ncpu = 2\n", "unknown key vm.cpu"),
        ("[vm]\nprovider = 'hyperv'\n", "unknown provider 'hyperv'"),
        ("[vm]\nbox_architecture = 'i386'\n", "unknown box architecture"),
        ("[vm]\nmemory = 128\n", "memory is in MB"),
        ("[vm]\ncpus = 0\n", "cpus must be at least 1"),
        ("[vm\n", "not valid TOML"),
        ("[vm]\nagent_path = 'nowhere'\n", "is not a directory"),
        ("[vm]\nlab_mode = true\nprovider = 'libvirt'\n", "lab_mode needs lab_kernel"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "usmlab.toml").write_text(toml)
    with pytest.raises(UsageError, match=message) as caught:
        load_settings(tmp_path, {}, {})
    assert "\n" not in str(caught.value)


def test_unknown_environment_setting_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="USMLAB_VM_BOXX: unknown VM setting"):
        load_settings(tmp_path, {"USMLAB_VM_BOXX": "x"}, {})


def test_default_toml_round_trips_to_the_defaults(tmp_path: Path) -> None:
    path = write_default_toml(tmp_path / "usmlab.toml")
    loaded = load_settings(tmp_path, {}, {})
    assert loaded == VmSettings()
    assert set(loaded.sources) >= {"box", "provider", "cpus", "memory", "profile"}
    with pytest.raises(UsageError, match="already exists"):
        write_default_toml(path)


# ------------------------------------------------------------------ Vagrant output handling


def test_ssh_details_keep_every_identity_file(tmp_path: Path) -> None:
    inserted = tmp_path / "private_key"
    inserted.write_text("key")
    text = (
        "Host default\n"
        "  HostName 127.0.0.1\n"
        "  User vagrant\n"
        "  Port 42222\n"
        "  UserKnownHostsFile /dev/null\n"
        "  IdentityFile /nonexistent/insecure_private_key\n"
        f'  IdentityFile "{inserted}"\n'
        "  IdentitiesOnly yes\n"
    )
    details = vagrant.parse_ssh_config(text)
    assert details["host"] == "127.0.0.1"
    assert details["port"] == 42222
    assert details["user"] == "vagrant"
    assert details["identity_file"] == str(inserted)  # the first one that exists
    assert details["identity_files"] == ["/nonexistent/insecure_private_key", str(inserted)]


def test_ssh_config_without_a_host_is_an_error() -> None:
    with pytest.raises(vagrant.VagrantError, match="no hostname"):
        vagrant.parse_ssh_config("Host default\n  User vagrant\n  Port 22\n")


def test_stderr_summary_is_the_first_sentence() -> None:
    timeout = (
        "Timed out while waiting for the machine to boot. This means that\n"
        "Vagrant was unable to communicate with the guest machine within\n"
        "the configured time period.\n\nIf you look above, you should be able to see\n"
    )
    assert vagrant.summarize_stderr(timeout) == "Timed out while waiting for the machine to boot."
    ruby = (
        "/usr/lib/ruby/vendor_ruby/fog/libvirt/requests/compute/vm_action.rb:7:in `create': "
        "Call to virDomainCreateWithFlags failed: internal error: Unknown CPU model max "
        "(Libvirt::Error)\n"
        "\tfrom /usr/lib/ruby/vendor_ruby/fog/libvirt/requests/compute/vm_action.rb:7:in `x'\n"
    )
    assert vagrant.summarize_stderr(ruby).startswith("Call to virDomainCreateWithFlags failed")
    assert vagrant.readable_stderr(ruby) == [vagrant.summarize_stderr(ruby)]


def test_upload_progress_bar_collapses_to_its_last_value() -> None:
    raw = "\x1b[KProgress: 0%\r\x1b[KProgress: 57%\r\x1b[KProgress: 100%\x1b[K==> default: Next\n"
    assert vagrant._readable(raw) == ["Progress: 100%", "==> default: Next"]
    assert vagrant._readable("    default: [usmlab] go 1.23.4: installed\n") == [
        "    default: [usmlab] go 1.23.4: installed"
    ]


# ------------------------------------------------------------------ test box recipe


def test_apt_mirror_is_read_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"
    )
    assert box.apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://other.example/debian bookworm main\n"
    )
    assert box.apt_mirror(tmp_path) == "http://other.example/debian"
    assert box.apt_mirror(tmp_path / "missing") == box.DEFAULT_MIRROR


def test_box_cache_key_follows_the_recipe() -> None:
    spec = box.recipe("amd64", "ssh-rsa AAAA test")
    assert box.recipe_key(spec) == box.recipe_key(box.recipe("amd64", "ssh-rsa AAAA test"))
    assert box.recipe_key(spec) != box.recipe_key(box.recipe("arm64", "ssh-rsa AAAA test"))
    assert "linux-image-arm64" in box.recipe("arm64", "k")["packages"]  # type: ignore[operator]


def test_a_silent_vm_step_still_says_what_it_waits_for() -> None:
    import time

    said: list[str] = []
    with Reporter(said.append).phase("vagrant up", total=8, every=1.0) as phase:
        phase.detail("I: Unpacking libc6...")
        time.sleep(2.6)
        phase.line("==> default: Starting domain.")
        time.sleep(0.5)
    waits = [line for line in said if "still waiting" in line]
    assert waits and all("still waiting for vagrant up (0/8 done)" in line for line in waits)
    assert all(line.endswith(": I: Unpacking libc6...") for line in waits)  # how far it is
    assert 1 <= len(waits) <= 3 and said[-1] == "==> default: Starting domain."


class RecordingPhase(Phase):
    """A phase that keeps every state its bar would show."""

    def __init__(self, shown: list[tuple[str, int, int | None, str]], *args: Any) -> None:
        super().__init__(*args)
        self.record = shown

    def shown(self) -> None:
        self.record.append((self.what, self.done, self.total, self.note))


class RecordingReporter(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.states: list[tuple[str, int, int | None, str]] = []
        super().__init__(self.lines.append)

    @contextlib.contextmanager
    def phase(self, what: str, total: int | None = None, every: float = 5.0) -> Iterator[Phase]:
        yield RecordingPhase(self.states, self.say, what, total)


# What `vagrant up` of the lab VM printed (vagrant 2.3.4, vagrant-libvirt 0.11.2), abridged.
VAGRANT_UP = """Bringing machine 'default' up with 'libvirt' provider...
==> default: Checking if box 'usmlab-test-d7cb32db5f75' version '0' is up to date...
==> default: Uploading base box image as volume into Libvirt storage...
==> default: Creating image (snapshot of base box volume).
==> default: Creating domain with the following settings...
==> default: Starting domain.
==> default: Waiting for domain to get an IP address...
==> default: Waiting for machine to boot. This may take a few minutes...
==> default: Machine booted and ready!
==> default: Rsyncing folder: /work/main/ => /vagrant
==> default: Running provisioner: usmlab (shell)...
    default: [usmlab] provisioning: profile test, kernel 6.1.0-28-amd64, amd64
    default: [usmlab] step 1/9: tools
    default: [usmlab] tools: already installed (curl)
    default: [usmlab] step 2/9: bpftrace
    default: [usmlab] step 9/9: dda
    default: [usmlab] skip dda (test profile)
    default: [usmlab] done: 0 changed, 8 already in place, 1 skipped
"""


def test_vagrant_up_is_a_boot_bar_then_a_provisioning_bar(tmp_path: Path) -> None:
    import time

    paths = vagrant.VmPaths(tmp_path)
    paths.state_dir.mkdir()
    reporter = RecordingReporter()
    lines = iter(line + "\n" for line in VAGRANT_UP.splitlines())
    ours = vagrant._stream(paths, "up", lines, reporter, time.monotonic())
    boot = [(done, total) for what, done, total, _ in reporter.states if what == "VM boot"]
    provisioning = [(done, total) for what, done, total, _ in reporter.states
                    if what == "provisioning"]  # fmt: skip
    assert [done for done, _ in boot] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # every step, in order
    assert {total for _, total in boot} == {len(vagrant.BOOT_STEPS)}
    assert provisioning == [(0, 9), (1, 9), (8, 9), (9, 9)]  # "done:" finishes the bar
    assert len(reporter.lines) == len(VAGRANT_UP.splitlines())  # every line still shown
    assert ours[-1].startswith("[usmlab] done: 0 changed")
    assert "Uploading base box image" in paths.output_log.read_text()


def test_a_vm_recorded_but_gone_is_said_by_every_verb_instead_of_running_on_the_host(
    tmp_path,
) -> None:
    (tmp_path / ".usmlab").mkdir()
    (tmp_path / ".usmlab" / "vm.json").write_text("{}")
    for verb in (["test", "scenario1", "--tracer", "none"], ["doctor"], ["cleanup"], ["build"]):
        done = run_usmlab(*verb, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, (verb, done.stderr)
        assert "the lab VM recorded in .usmlab/ is gone" in done.stderr, verb
        assert not (tmp_path / "runs").exists()


def test_every_verb_says_its_default_target_in_its_help() -> None:
    from typer.testing import CliRunner

    from usmlab.cli import app

    for verb in ("test", "doctor", "cleanup", "build"):
        shown = CliRunner().invoke(app, [verb, "--help"]).output
        words = " ".join(shown.replace("│", " ").split())  # rich wraps the help in a box
        assert "the lab VM when it exists" in words or "the default when it exists" in words


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")
def test_a_missing_provider_is_named_with_the_plugin_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real Vagrant, asked for a provider it has no plugin for: the error says which, and how
    to get it (Vagrant prints that cause on stdout only, under --machine-readable)."""
    (tmp_path / "Vagrantfile").write_text('Vagrant.configure("2") do |c|\n  c.vm.box = "x"\nend\n')
    monkeypatch.setenv("VAGRANT_DEFAULT_PROVIDER", "parallels")
    with pytest.raises(vagrant.VagrantError) as raised:
        vagrant.status(tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert "The provider 'parallels' could not be found" in message
    assert "vagrant plugin install vagrant-parallels" in message


def test_usual_first_errors_have_a_next_step() -> None:
    assert "libvirtd -d" in vagrant.next_step(
        "", "Failed to connect socket to '/var/run/libvirt/libvirt-sock'"
    )
    assert "--lab" in vagrant.next_step("Vagrant::Errors::BoxNotFound", "")
    assert "dnsmasq-base" in vagrant.next_step("", "dnsmasq: command not found")
    assert vagrant.next_step("", "Timed out while waiting for the machine to boot.") == ""


def _cached_box(cache: Path, key: str, arch: str) -> box.TestBox:
    folder = cache / key
    folder.mkdir(parents=True)
    for name in (box.BOX_FILE, "vmlinuz", "initrd.img"):
        (folder / name).write_bytes(b"x")
    record = {"name": f"usmlab-test-{key}", "box_file": str(folder / box.BOX_FILE),
              "kernel": str(folder / "vmlinuz"), "initrd": str(folder / "initrd.img"),
              "cmd_line": box.kernel_cmdline(arch), "arch": arch}  # fmt: skip
    (folder / "box.json").write_text(json.dumps(record))
    found = box.cached_test_box(cache, key)
    assert found is not None
    return found


def test_a_new_box_replaces_its_own_architectures_only(tmp_path: Path) -> None:
    """Building the arm64 box must not throw away the x86_64 one (both are used)."""
    old_arm = _cached_box(tmp_path, "aaaaaaaaaaaa", "arm64")
    amd = _cached_box(tmp_path, "bbbbbbbbbbbb", "amd64")
    new_arm = _cached_box(tmp_path, "cccccccccccc", "arm64")
    kept = box.prune_stale_cache(new_arm, tmp_path, progress=lambda _: None)
    assert kept == {new_arm.name, amd.name}
    assert not old_arm.box_file.parent.exists()
    assert amd.box_file.exists() and new_arm.box_file.exists()


def _failed_up(cwd: Path, env: dict[str, str], box_name: str) -> str:
    """`usmlab up` of a libvirt VM from box_name, expected to fail (exit 4): its error line."""
    done = run_usmlab(
        "up", "--provider", "libvirt", "--box", box_name, "--profile", "test",
        cwd=cwd, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(
    shutil.which("vagrant") is None or shutil.which("libvirtd") is None or os.geteuid() != 0,
    reason="needs vagrant, libvirtd and root",
)
def test_no_box_reachable_names_the_cause_and_the_offline_ways(tmp_path: Path) -> None:
    """Real Vagrant, a box URL nothing answers (on loopback: the lab never goes further).
    vagrant-libvirt asks libvirtd before it fetches a box: the daemons must run."""
    from usmlab.vm import libvirt_host

    env = {**os.environ, "USMLAB_VM_BOX_URL": "http://127.0.0.1:9/usmlab-none.box",
           "VAGRANT_HOME": str(tmp_path / "vagrant-home")}  # fmt: skip
    started = libvirt_host.ensure_libvirt_daemons(lambda _: None)
    try:
        error = _failed_up(tmp_path, env, "usmlab-none")
    finally:
        libvirt_host.stop_daemons(started)
    assert error.startswith("usmlab: error: vagrant up failed")
    assert "error while downloading" in error
    assert "`usmlab up --lab` builds a local one" in error and "--box NAME" in error


def _libvirt_listening() -> bool:
    return any(
        Path(p).exists() for p in ("/var/run/libvirt/libvirt-sock", "/run/libvirt/libvirt-sock")
    )


@pytest.mark.skipif(
    shutil.which("vagrant") is None or shutil.which("qemu-img") is None,
    reason="needs vagrant (with vagrant-libvirt) and qemu-img",
)
def test_libvirtd_not_running_is_named_with_how_to_start_it(tmp_path: Path) -> None:
    """Real Vagrant and vagrant-libvirt, a real (tiny, local) libvirt box in a private
    VAGRANT_HOME, and no libvirtd: the error says so and how to start it."""
    if _libvirt_listening():
        pytest.skip("libvirtd is running here (its socket exists); this needs it stopped")
    box_dir = tmp_path / "box"
    box_dir.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(box_dir / "box.img"), "16M"],
                   check=True)  # fmt: skip
    (box_dir / "metadata.json").write_text('{"provider": "libvirt", "format": "qcow2", '
                                           '"virtual_size": 1}')  # fmt: skip
    (box_dir / "Vagrantfile").write_text('Vagrant.configure("2") do |c|\nend\n')
    subprocess.run(["tar", "-cf", "tiny.box", "metadata.json", "Vagrantfile", "box.img"],
                   cwd=box_dir, check=True)  # fmt: skip
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant-home"),
           "VAGRANT_CHECKPOINT_DISABLE": "1"}  # fmt: skip
    added = subprocess.run(
        ["vagrant", "box", "add", "--name", "usmlab-tiny", str(box_dir / "tiny.box")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    root = tmp_path / "vm"
    root.mkdir()
    error = _failed_up(root, env, "usmlab-tiny")
    assert "libvirt-sock" in error
    assert "libvirtd is not running: start `virtlogd -d` and `libvirtd -d`" in error
