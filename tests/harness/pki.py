"""Test PKI for the control plane: a CA, an admin client certificate and the service-account key.

Client certificates (organisation `system:masters` for the admin) are how kubeadm clusters
authenticate their own components, so the tests exercise the same RBAC path as a real cluster.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, organisation: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    admin_cert: Path
    admin_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path


def issue_client_cert(pki_dir: Path, ca_cert: Path, ca_key: Path, user: str, group: str | None) -> tuple[Path, Path]:
    """A client certificate for `user` (CN) in `group` (O), signed by the test CA."""
    usage = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
    return _issue(pki_dir, ca_cert, ca_key, _name(user, group), user.replace(":", "_"), [usage])


def issue_serving_cert(pki_dir: Path, ca_cert: Path, ca_key: Path) -> tuple[Path, Path]:
    """A serving certificate for 127.0.0.1 and localhost, so clients verify the apiserver."""
    usage = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    return _issue(pki_dir, ca_cert, ca_key, _name("kube-apiserver"), "serving", [usage, names])


def _issue(pki_dir: Path, ca_cert: Path, ca_key: Path, subject: x509.Name, stem: str, extensions) -> tuple[Path, Path]:
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )
    for extension in extensions:
        cert = cert.add_extension(extension, critical=False)
    cert = cert.sign(signer, hashes.SHA256())
    cert_path, key_path = pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


def make_pki(pki_dir: Path) -> Pki:
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dhad-test-ca"))
        .issuer_name(_name("dhad-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_cert_path, ca_key_path = pki_dir / "ca.crt", pki_dir / "ca.key"
    ca_cert_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca_key_path.write_bytes(_pem_key(ca_key))
    admin_cert, admin_key = issue_client_cert(pki_dir, ca_cert_path, ca_key_path, "admin", "system:masters")
    serving_cert, serving_key = issue_serving_cert(pki_dir, ca_cert_path, ca_key_path)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_key, sa_pub = pki_dir / "sa.key", pki_dir / "sa.pub"
    sa_key.write_bytes(_pem_key(sa))
    sa_pub.write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return Pki(ca_cert_path, ca_key_path, admin_cert, admin_key, serving_cert, serving_key, sa_key, sa_pub)
