"""Renders the VM provisioning script from provision/*.sh.j2 with the versions it must install.

Versions are decided here, on the host, so the rendered script is a complete, reviewable record of
what a VM gets; the Go version comes from the agent checkout's .go-version, like the agent's own
tooling does.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from usmlab.errors import UsageError
from usmlab.vm.settings import AGENT_MOUNT, VmSettings, resolved_agent_path

PROVISION_DIR = Path(__file__).resolve().parents[2] / "provision"
SCRIPT_TEMPLATE = "provision.sh.j2"
_GO_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?((rc|beta)\d+)?$")
_PACKAGE_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+~-]*$")


@dataclass(frozen=True)
class ProvisionScript:
    """A rendered script and the digest that tells whether a VM already ran this exact one."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_go_version(checkout: Path) -> str:
    """The Go version a datadog-agent checkout asks for (its .go-version file)."""
    path = checkout / ".go-version"
    try:
        version = path.read_text().strip()
    except OSError:
        raise UsageError(f"{path} not found: is {checkout} a datadog-agent checkout?") from None
    version = version.removeprefix("go")
    if not _GO_VERSION.match(version):
        raise UsageError(f"{path}: not a Go version: {version!r}")
    return version


def provision_params(settings: VmSettings, cwd: Path) -> dict[str, str]:
    """The template's parameters, all strings; empty means 'not pinned' or 'not available'."""
    go_version, go_source = settings.go_version.removeprefix("go"), "go_version setting"
    checkout = resolved_agent_path(settings, cwd)
    if not go_version and checkout is not None:
        go_version, go_source = read_go_version(checkout), f"{checkout.name}/.go-version"
    if go_version and not _GO_VERSION.match(go_version):
        raise UsageError(f"go_version {go_version!r} is not a Go version like 1.23.4")
    for key in ("dda_version", "clang_version"):
        value = getattr(settings, key)
        if value and not _PACKAGE_VERSION.match(value):
            raise UsageError(f"{key} {value!r} is not a version number")
    return {
        "profile": settings.profile,
        "agent_dir": AGENT_MOUNT if checkout is not None else "",
        "go_version": go_version,
        "go_version_source": go_source if go_version else "",
        "dda_version": settings.dda_version,
        "clang_version": settings.clang_version,
    }


def shell_quote(value: object) -> str:
    """Always single-quoted (shlex.quote leaves `test` bare, which shellcheck flags)."""
    return "'" + str(value).replace("'", "'\\''") + "'"


def _environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shquote"] = shell_quote
    return env


def render_provision(
    settings: VmSettings, cwd: Path, template_dir: Path = PROVISION_DIR
) -> ProvisionScript:
    """The provisioning script for these settings."""
    template = _environment(template_dir).get_template(SCRIPT_TEMPLATE)
    text = template.render(**provision_params(settings, cwd))
    return ProvisionScript(name=SCRIPT_TEMPLATE.removesuffix(".j2"), text=text)


def write_provision(script: ProvisionScript, out_dir: Path) -> Path:
    """Write the rendered script where the Vagrantfile's shell provisioner picks it up."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / script.name
    if not path.exists() or path.read_text() != script.text:
        path.write_text(script.text)
    path.chmod(0o755)
    return path
