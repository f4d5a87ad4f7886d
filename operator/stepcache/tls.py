"""Certificates and keys, made with the `cryptography` package.

The webhook must serve TLS that the API server trusts, and the local control plane used by the end-to-end tests
needs a whole PKI (a CA, serving and client certificates, service-account signing keys). One small module makes
both, so `stepcache certs` and the test harness issue certificates the same way.

Everything here returns PEM bytes; only `write_pair` touches the file system.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
import tempfile
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "issue", "make_ca", "make_rsa_key_pem", "write_pair"]

# Certificates are backdated a little so a clock that is slightly behind (another container, a VM) accepts them.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Issued:
    """A certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def make_ca(common_name: str, *, days: int = 3650) -> Issued:
    """Make a self-signed certificate authority (EC P-256) that can sign leaf certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_private_pem(key))


def issue(
    ca: Issued,
    *,
    common_name: str,
    organizations: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    days: int = 365,
) -> Issued:
    """Issue a leaf certificate signed by `ca`.

    Kubernetes reads a client's user from the common name and its groups from the organizations. Go's TLS ignores
    the common name of a server, so a serving certificate needs its names in `dns_names`/`ip_addresses`.
    """
    if not (server or client):
        raise ValueError("a certificate must be for a server, a client or both")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported CA key type: {type(ca_key).__name__}")
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_private_pem(key))


def make_rsa_key_pem() -> tuple[bytes, bytes]:
    """Make an RSA-2048 key pair: (private PEM, public PEM), as service-account token signing expects."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return _private_pem(key), public


def write_pair(issued: Issued, *, cert_file: pathlib.Path, key_file: pathlib.Path) -> None:
    """Write the certificate (mode 0644) and key (mode 0600), each atomically: a reader never sees half a file."""
    _write_atomically(key_file, issued.key_pem, mode=0o600)
    _write_atomically(cert_file, issued.cert_pem, mode=0o644)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures for every certificate (ECDSA handshakes); certificate and CRL signing for CAs only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomically(path: pathlib.Path, data: bytes, *, mode: int) -> None:
    # The temporary file is created with the final mode, so a key is never readable by others, not even briefly.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
