"""Device keys for Flower's SuperNode authentication, as both sides see them.

A device proves itself with an ECDSA key on a NIST curve, in OpenSSH format (what
``flower-supernode --auth-supernode-private-key`` loads). The device shows its public key as one
OpenSSH line; the operator registers that line; both compare keys by the ``SHA256:`` fingerprint
``ssh-keygen -lf`` prints, read aloud or pasted through a channel they trust.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedvox.shared.errors import ConfigError


def parse_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """A device key from its OpenSSH line (``ecdsa-sha2-nistp384 AAAA... comment``) or a file
    holding it; only NIST EC keys, the ones Flower's SuperNode authentication accepts."""
    text = value.strip()
    if not text.startswith("ecdsa-") and _is_file(text):
        text = Path(text).expanduser().read_text().strip()
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"not an OpenSSH public key ({exc}): pass the line `fedvox-client enroll` printed "
            "(it starts with ecdsa-sha2-nistp) or the .pub file"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise ConfigError("SuperNode authentication needs an ECDSA key on a NIST curve (ssh-keygen -t ecdsa)")
    return key


def _is_file(text: str) -> bool:
    """Whether ``text`` names a file; a pasted key line of another type is no path (and can be
    too long for one: ``is_file`` raises ENAMETOOLONG on a 372-character RSA line)."""
    try:
        return Path(text).expanduser().is_file()
    except OSError:
        return False


def ssh_text(key: ec.EllipticCurvePublicKey) -> str:
    """The key as an OpenSSH line without a comment."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>``, as ``ssh-keygen -lf key.pub`` prints it."""
    blob = base64.b64decode(ssh_text(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


__all__ = ["fingerprint", "parse_public_key", "ssh_text"]
