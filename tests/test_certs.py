"""Certificates for the federation: chain, SANs, key usage, file modes, overwrite protection."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from nephrolith.common.errors import ConfigError
from nephrolith.server.certs import make_certs


def _load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_chain_sans_and_modes(tmp_path):
    # Execute
    paths = make_certs(
        tmp_path / "certs",
        ("fed.example.org", "localhost", "10.1.2.3"),
        days=30,
        nodes=("hospital1",),
    )

    # Assert: the server certificate verifies against the CA with Python's own TLS stack.
    ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    ctx.load_cert_chain(str(paths.server_cert), str(paths.server_key))  # key matches cert
    ca, server = _load(paths.ca_cert), _load(paths.server_cert)
    assert server.issuer == ca.subject
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fed.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert lifetime == dt.timedelta(days=30)

    # Private keys are 0600, certificates 0644.
    for key in (paths.ca_key, paths.server_key, paths.node_keys["hospital1"][0]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for public in (paths.ca_cert, paths.server_cert, paths.node_keys["hospital1"][1]):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public

    # The SuperNode key is in OpenSSH format, which Flower loads with load_ssh_private_key.
    node_key, node_pub = paths.node_keys["hospital1"]
    loaded = serialization.load_ssh_private_key(node_key.read_bytes(), password=None)
    assert node_pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (
        loaded.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        == node_pub.read_text().strip()
    )


def test_openssl_verifies_default_hosts(tmp_path):
    paths = make_certs(tmp_path)
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(paths.ca_cert), str(paths.server_cert)],
        capture_output=True,
        text=True,
    )
    if done.returncode == 127:
        pytest.skip("openssl not installed")
    assert done.stdout.strip().endswith(": OK"), done.stdout + done.stderr
    sans = (
        _load(paths.server_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_existing_files_are_kept_unless_overwrite(tmp_path):
    first = make_certs(tmp_path)
    before = first.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="already exist; pass --overwrite"):
        make_certs(tmp_path)
    assert first.ca_cert.read_bytes() == before
    make_certs(tmp_path, overwrite=True)
    assert first.ca_cert.read_bytes() != before


@pytest.mark.parametrize("host", ["bad host", "http://x", ""])
def test_bad_hosts_are_rejected(tmp_path, host):
    with pytest.raises(ConfigError, match="host"):
        make_certs(tmp_path, (host,))


def test_cli_writes_files(tmp_path):
    out = tmp_path / "c"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nephrolith.server.cli",
            "certs",
            "--out",
            str(out),
            "--host",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "copy to every hospital" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
