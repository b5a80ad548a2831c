"""TLS certificates and SuperNode keys for the federation, made with the `cryptography` package."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nephrolith.common.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class CertPaths:
    """Files written by make_certs.

    Attributes:
        ca_cert: CA certificate; copy it to every hospital (public).
        ca_key: CA private key; stays with the operator, offline if possible.
        server_cert: server certificate, signed by the CA, with the SANs.
        server_key: server private key; stays on the server.
        node_keys: per-hospital (private OpenSSH key, public key) for SuperNode auth.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write bytes with the given mode; private files are created 0600 before any byte lands."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # os.open only applies the mode when it creates the file


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-384 matches what Flower's SuperNode auth accepts (NIST curves) and is fast to generate.
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(ch in host for ch in " /:@"):
                raise ConfigError(
                    f"certs --host: expected a DNS name or an IP address, got {host!r}"
                ) from None
            names.append(x509.DNSName(host))
    if not names:
        raise ConfigError("certs --host: give at least one host name or IP address")
    return names


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed CA key and certificate valid for `days` days."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nephrolith federation CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: tuple[str, ...],
    days: int,
    *,
    not_before: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a server key and a certificate signed by the CA for the given hosts.

    Args:
        ca_key: the CA private key.
        ca_cert: the CA certificate.
        hosts: DNS names and IP addresses the clients use to reach the server;
            each becomes a subjectAltName (clients check the address against them).
        days: validity in days from `not_before`.
        not_before: start of validity; defaults to five minutes ago (clock skew).

    Raises:
        ConfigError: when a host is neither a DNS name nor an IP address.
    """
    key = _new_key()
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    sans = _subject_alt_names(hosts)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair `<name>.key` (0600) and `<name>.pub`.

    Flower loads the private key with `load_ssh_private_key`, so it is written in
    OpenSSH format; the public key is in OpenSSH one-line format.
    """
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ConfigError(f"certs --node: expected letters, digits, '-' or '_', got {name!r}")
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    _write(key_path, private, PRIVATE_MODE)
    _write(pub_path, public + b"\n", PUBLIC_MODE)
    return key_path, pub_path


def make_certs(
    out_dir: Path,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    days: int = 365,
    nodes: tuple[str, ...] = (),
    overwrite: bool = False,
) -> CertPaths:
    """Write a CA, a server certificate for `hosts` and optional SuperNode keys into `out_dir`.

    Private keys are written with mode 0600 and certificates with 0644.

    Args:
        out_dir: target folder, created when missing.
        hosts: subjectAltNames of the server certificate (DNS names or IPs).
        days: validity of the CA and the server certificate.
        nodes: hospital names that get a SuperNode authentication key pair.
        overwrite: replace existing files; otherwise existing files raise.

    Raises:
        ConfigError: when files exist and overwrite is False, or on a bad host, name or days.
    """
    if days < 1:
        raise ConfigError(f"certs --days: expected >= 1, got {days}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    targets += [out_dir / f"{n}.{ext}" for n in nodes for ext in ("key", "pub")]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{out_dir}: {existing} already exist; pass --overwrite to replace them "
            "(every hospital then needs the new ca.pem)"
        )

    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, tuple(hosts), days)
    pem = serialization.Encoding.PEM
    _write(out_dir / CA_KEY, _pem_key(ca_key), PRIVATE_MODE)
    _write(out_dir / CA_CERT, ca_cert.public_bytes(pem), PUBLIC_MODE)
    _write(out_dir / SERVER_KEY, _pem_key(server_key), PRIVATE_MODE)
    _write(out_dir / SERVER_CERT, server_cert.public_bytes(pem), PUBLIC_MODE)
    node_keys = {name: make_node_key(out_dir, name) for name in nodes}
    logger.info("wrote CA and server certificate for %s into %s", ", ".join(hosts), out_dir)
    return CertPaths(
        ca_cert=out_dir / CA_CERT,
        ca_key=out_dir / CA_KEY,
        server_cert=out_dir / SERVER_CERT,
        server_key=out_dir / SERVER_KEY,
        node_keys=node_keys,
    )


def check_server_files(cert_dir: Path) -> tuple[Path, Path, Path]:
    """Return (ca.pem, server.pem, server.key) in `cert_dir`, raising when one is missing.

    Raises:
        ConfigError: naming the missing file and the command that creates it.
    """
    paths = tuple(Path(cert_dir) / n for n in (CA_CERT, SERVER_CERT, SERVER_KEY))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"missing TLS files {missing}; create them with `nephrolith-server certs "
            f"--out {cert_dir}`"
        )
    return paths  # type: ignore[return-value]
