"""The lab CA and server certificate: valid for loopback names, private, reused, renewed."""

import datetime as dt
import ipaddress
import ssl
import stat

from cryptography import x509

from usmlab.certs import ensure_certs


def test_server_cert_verifies_against_the_ca_for_every_loopback_name(tmp_path):
    certs = ensure_certs(tmp_path)
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips
    # The same chain a client with --cacert builds: loads and matches the key.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    assert client_ctx.cert_store_stats()["x509_ca"] == 1


def test_private_keys_are_owner_only(tmp_path):
    certs = ensure_certs(tmp_path)
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certificates_are_reused_across_runs(tmp_path):
    first = ensure_certs(tmp_path).server_cert.read_bytes()
    second = ensure_certs(tmp_path).server_cert.read_bytes()
    assert first == second


def test_certificates_near_expiry_are_regenerated(tmp_path):
    first = ensure_certs(tmp_path).server_cert.read_bytes()
    # Everything expires within 400 days: a renewal window that long forces new certificates.
    renewed = ensure_certs(tmp_path, renew_within=dt.timedelta(days=400))
    assert renewed.server_cert.read_bytes() != first


def test_a_corrupt_certificate_is_replaced(tmp_path):
    certs = ensure_certs(tmp_path)
    certs.server_cert.write_text("garbage")
    again = ensure_certs(tmp_path)
    x509.load_pem_x509_certificate(again.server_cert.read_bytes())


def test_current_certificates_are_vouched_for_without_cryptography(tmp_path):
    """A run start checks its certificates against expiry.json (sha256 + expiry) and does not
    import cryptography; a certificate changed behind its back is parsed again."""
    import subprocess
    import sys

    certs = ensure_certs(tmp_path)
    check = (
        "import sys; from pathlib import Path; from usmlab.certs import ensure_certs; "
        f"ensure_certs(Path({str(tmp_path)!r})); print('cryptography' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr
    certs.server_cert.write_text("garbage")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert loaded.stdout.strip() == "True", loaded.stderr
    x509.load_pem_x509_certificate(certs.server_cert.read_bytes())  # replaced, valid again
