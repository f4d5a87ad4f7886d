"""Certificates from stepcache.tls: what a TLS client checks (chain, names, usages) and the key file's mode."""

from __future__ import annotations

import pathlib
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from stepcache import tls


def test_a_serving_certificate_is_signed_by_the_ca_and_names_its_hosts() -> None:
    ca = tls.make_ca("test CA")
    served = tls.issue(ca, common_name="webhook", dns_names=["svc.local"], ip_addresses=["127.0.0.1"], server=True)
    cert = x509.load_pem_x509_certificate(served.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["svc.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert ExtendedKeyUsageOID.CLIENT_AUTH not in usages
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_client_certificate_carries_its_groups_as_organizations() -> None:
    ca = tls.make_ca("test CA")
    client = tls.issue(ca, common_name="admin", organizations=["system:masters"], client=True)
    cert = x509.load_pem_x509_certificate(client.cert_pem)
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)]
    assert orgs == ["system:masters"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages


def test_a_certificate_must_be_for_a_server_or_a_client() -> None:
    with pytest.raises(ValueError, match="server, a client or both"):
        tls.issue(tls.make_ca("test CA"), common_name="nobody")


def test_written_pairs_complete_a_real_tls_handshake(tmp_path: pathlib.Path) -> None:
    ca = tls.make_ca("test CA")
    served = tls.issue(ca, common_name="127.0.0.1", ip_addresses=["127.0.0.1"], server=True)
    tls.write_pair(served, cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        assert conn.recv(2) == b"ok"
    thread.join(timeout=5)
    listener.close()
