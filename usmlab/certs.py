"""The lab's certificate authority and server certificate.

The workloads speak real TLS, so they need a CA the client can verify against (`--cacert`) and a
server certificate valid for every loopback name the lab uses. Both are kept in a state folder and
reused across runs; regenerated when missing, unreadable or within `renew_within` of expiry.

`expiry.json` beside them records each certificate's sha256 and expiry when it is written, so a
run whose certificates are current checks them without importing cryptography (~50 ms of every
`usmlab test` start); any mismatch takes the full path, which parses the files themselves.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
VALIDITY = dt.timedelta(days=365)
RENEW_WITHIN = dt.timedelta(days=30)


@dataclass(frozen=True)
class LabCerts:
    """Paths of the PEM files the workloads load."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def files(self) -> list[Path]:
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key]


def ensure_certs(directory: Path, renew_within: dt.timedelta = RENEW_WITHIN) -> LabCerts:
    """Return usable lab certificates in `directory`, creating or renewing them as needed.

    Several runs may start at once (many targets, or two terminals): a lock makes one of them
    create the files while the others wait, so nobody pairs a key with another run's CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(directory, renew_within)


def _ensure_locked(directory: Path, renew_within: dt.timedelta) -> LabCerts:
    certs = LabCerts(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    now = dt.datetime.now(dt.UTC)
    keys_exist = certs.ca_key.exists() and certs.server_key.exists()
    if keys_exist and _recorded_valid(directory, certs, now + renew_within):
        return certs
    ca_ok = _valid_until(certs.ca_cert, now + renew_within) and certs.ca_key.exists()
    if not ca_ok:
        _write_ca(certs, now)
    if not ca_ok or not (
        _valid_until(certs.server_cert, now + renew_within) and certs.server_key.exists()
    ):
        _write_server(certs, now)
    _record(directory, certs)
    return certs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded_valid(directory: Path, certs: LabCerts, when: dt.datetime) -> bool:
    """Whether expiry.json vouches for both certificates (same bytes, valid past `when`)."""
    try:
        recorded = json.loads((directory / "expiry.json").read_text())
        for cert in (certs.ca_cert, certs.server_cert):
            entry = recorded[cert.name]
            if entry["sha256"] != _sha256(cert):
                return False
            if dt.datetime.fromisoformat(entry["not_after"]) <= when:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _record(directory: Path, certs: LabCerts) -> None:
    """Write expiry.json for the certificates as they are now (parsed, not assumed)."""
    from cryptography import x509

    entries = {}
    for cert in (certs.ca_cert, certs.server_cert):
        data = cert.read_bytes()
        parsed = x509.load_pem_x509_certificate(data)
        entries[cert.name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "not_after": parsed.not_valid_after_utc.isoformat(),
        }
    (directory / "expiry.json").write_text(json.dumps(entries, indent=2) + "\n")


def _valid_until(path: Path, when: dt.datetime) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > when


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Private keys are created 0600 from the start, never world-readable even briefly."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_ca(certs: LabCerts, now: dt.datetime) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "usmlab CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(certs.ca_key, key)
    certs.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_server(certs: LabCerts, now: dt.datetime) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "usmlab-server")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_key(certs.server_key, key)
    certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
