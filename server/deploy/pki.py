"""The server's TLS certificates: a private CA, the certificate devices check, and checks on both.

Devices trust exactly one root, the server home's ``pki/ca.crt``, which the operator hands to
every device owner; the server certificate it signs names every host name and address devices
use to reach the server (subject alternative names: TLS clients match nothing else). An operator
who already has a CA (or a public certificate) brings it instead, and :func:`check_server_pair`
makes sure the three files fit before anything listens.

Keys are EC P-256 (fast handshakes, universal TLS support) and written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvox.shared.atomic import atomic_path
from fedvox.shared.errors import DeploymentError

CA_DAYS = 3650
SERVER_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before now, so a device whose clock lags a little accepts them."""


def create_ca(common_name: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Iterable[str],
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``names`` (host names and IP addresses), signed by the CA."""
    names = list(dict.fromkeys(names))
    if not names:
        raise DeploymentError("a server certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# ---------------------------------------------------------------------- files
def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PEM, unencrypted (the server starts unattended), readable by its owner only."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with atomic_path(path) as tmp:  # created 0600 by mkstemp, so never readable by others
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """PEM, world-readable (certificates are public)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(tmp, 0o644)


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"cannot read certificate {path}: {exc}; give a PEM-encoded X.509 file") from exc


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise DeploymentError(
            f"cannot read private key {path}: {exc}; give an unencrypted PEM key (the server starts unattended)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{path} is a {type(key).__name__}; fedvox generates and expects EC keys")
    return key


# ---------------------------------------------------------------------- checks
def subject_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS names and IP addresses (what TLS clients match)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def check_server_pair(
    cert_path: Path, key_path: Path, ca_path: Path, names: Iterable[str] = (), *, at: dt.datetime | None = None
) -> x509.Certificate:
    """Check that the server certificate is valid now, matches its key, is signed by the CA and
    names every host in ``names``; returns it. Raises :class:`DeploymentError` saying which."""
    cert, ca = load_certificate(cert_path), load_certificate(ca_path)
    key = load_private_key(key_path)
    when = at or _now()
    for what, c, path in (("server certificate", cert, cert_path), ("CA certificate", ca, ca_path)):
        if when < c.not_valid_before_utc:
            raise DeploymentError(
                f"the {what} {path} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this "
                "machine's clock"
            )
        if when > c.not_valid_after_utc:
            raise DeploymentError(
                f"the {what} {path} expired on {c.not_valid_after_utc:%Y-%m-%d}; issue a new one "
                "(fedvox-server init --renew-certificate DIR) and restart"
            )
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise DeploymentError(f"the server key {key_path} does not belong to the certificate {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise DeploymentError(
            f"the server certificate {cert_path} is not signed by the CA {ca_path} ({exc}); devices "
            "would refuse it. Give the CA that issued it"
        ) from exc
    missing = [n for n in names if not covers(cert, n)]
    if missing:
        raise DeploymentError(
            f"the server certificate {cert_path} is not valid for {', '.join(missing)} (it names "
            f"{', '.join(subject_names(cert)) or 'nothing'}); devices connecting by that name would "
            "refuse it. Issue one that names it (fedvox-server init --renew-certificate --name ...)"
        )
    return cert


def covers(cert: x509.Certificate, name: str) -> bool:
    """Whether a TLS client connecting to ``name`` accepts ``cert`` (IP exact; DNS with a
    left-most ``*`` wildcard, case-insensitive)."""
    listed = subject_names(cert)
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        name = name.lower().rstrip(".")
        for entry in (n.lower().rstrip(".") for n in listed if not _is_ip(n)):
            if entry == name or (entry.startswith("*.") and name.split(".", 1)[-1] == entry[2:] and "." in name):
                return True
        return False
    return any(_is_ip(n) and ipaddress.ip_address(n) == ip for n in listed)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


__all__ = [
    "check_server_pair",
    "covers",
    "create_ca",
    "issue_server_certificate",
    "load_certificate",
    "load_private_key",
    "subject_names",
    "write_certificate",
    "write_private_key",
]
