"""Signed ledger heads: a device's word on its ledger, kept by someone else.

A ledger's hash chain shows an edit only to someone who knows what the chain was: its owner can
drop the triggers, rewrite rows, recompute every epsilon and hash, and hand over a ledger that
verifies. So every reply a device sends carries its ledger's head, the row count and the last
row's hash, signed with the device key. The server records the signed heads of every round;
the audit (:func:`check_heads`) then holds the device's ledger against them: row ``rows`` of
the ledger must still be the row whose hash was signed. Because each row hashes the one before
it, that pins every earlier row too, so a rewrite or truncation of anything the device had
reported is caught. It does not show whether a release was recorded truthfully in the first
place, nor anything about rows written after the last report (docs/privacy.md).

In deployment the key is the device's SuperNode key (``fedvox-client enroll`` names it in the
node config as ``signing-key``); in simulation each simulated device makes its own key next to
its ledger, so the same path runs.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedvox.shared.atomic import atomic_path
from fedvox.shared.errors import ConfigError, LedgerIntegrityError, ProtocolError
from fedvox.shared.privacy.ledger import GENESIS_HASH, Ledger, LedgerRow

if TYPE_CHECKING:  # flwr (through the device keys too) loads on first use: fedvox-audit starts without it
    from flwr.app import ConfigRecord

LEDGER_HEAD = "ledger-head"
"""Record key of the signed head in every reply a device sends with its ledger open."""
METRICS_FILE = "metrics.jsonl"
"""Where a server's run directory keeps its round records, signed heads included."""
SIGNING_KEY_FILE = "ledger-signing.key"
"""The key a device without a SuperNode key (a simulated one) makes next to its ledger."""
_DOMAIN = "fedvox ledger head v1"


@dataclass(frozen=True)
class SignedHead:
    """``rows`` and ``head`` of a device's ledger, signed by its key, in reply to ``context``."""

    client_id: str
    rows: int
    head: str
    context: str
    """What the device was answering (``run-id/round``): binds the statement to one reply."""
    public_key: str
    """The signer's public key as an OpenSSH line."""
    signature: str
    """Base64 DER ECDSA-SHA256 signature over :meth:`message`."""

    def message(self) -> bytes:
        body = {"client-id": self.client_id, "rows": self.rows, "head": self.head, "context": self.context}
        return (_DOMAIN + "\n" + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()

    @property
    def fingerprint(self) -> str:
        from fedvox.shared.device_keys import fingerprint, parse_public_key

        return fingerprint(parse_public_key(self.public_key))

    def verify(self) -> None:
        """Raise :class:`LedgerIntegrityError` unless the signature is the key's over this head."""
        from fedvox.shared.device_keys import parse_public_key

        try:
            key = parse_public_key(self.public_key)
            key.verify(base64.b64decode(self.signature, validate=True), self.message(), ec.ECDSA(hashes.SHA256()))
        except (ConfigError, InvalidSignature, ValueError) as exc:
            raise LedgerIntegrityError(
                f"the signed ledger head of client {self.client_id!r} ({self.context}) does not verify: "
                f"{exc or 'bad signature'}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> SignedHead:
        """Parse a head from a reply record or a server's log; raises :class:`ProtocolError`."""
        try:
            head = cls(**{name: values[name.replace("_", "-")] for name in cls.__dataclass_fields__})
        except KeyError as exc:
            raise ProtocolError(f"a signed ledger head lacks {exc.args[0]!r}") from None
        ints = ("rows",)
        for name, value in asdict(head).items():
            wanted = int if name in ints else str
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ProtocolError(f"signed ledger head {name} must be a {wanted.__name__}, got {value!r}")
        if head.rows < 0 or len(head.head) != 64:
            raise ProtocolError(f"signed ledger head has {head.rows} rows and head {head.head!r}")
        return head

    def to_record(self) -> ConfigRecord:
        from flwr.app import ConfigRecord

        return ConfigRecord(self.to_json())


def signing_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The EC private key (OpenSSH format) at ``path``, made on first use (0600)."""
    path = Path(path)
    if not path.is_file():
        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        with atomic_path(candidate) as tmp:  # mkstemp: 0600 from the start
            tmp.write_bytes(pem)
        try:
            os.link(candidate, path)  # another process of the same device may have made one first: theirs wins
        except FileExistsError:
            pass
        finally:
            candidate.unlink(missing_ok=True)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a usable OpenSSH key ({exc}); move it away to make a new one") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA key; ledger heads are signed with the device's EC key")
    return key


def sign_head(ledger: Ledger, client_id: str, key: ec.EllipticCurvePrivateKey, context: str) -> SignedHead:
    """The current head of ``ledger``, signed with ``key``."""
    from fedvox.shared.device_keys import ssh_text

    rows = ledger.rows()
    unsigned = SignedHead(
        client_id, len(rows), rows[-1].row_hash if rows else GENESIS_HASH, context, ssh_text(key.public_key()), ""
    )
    signature = key.sign(unsigned.message(), ec.ECDSA(hashes.SHA256()))
    return SignedHead(**{**asdict(unsigned), "signature": base64.b64encode(signature).decode()})


def head_record(ledger: Ledger, client_id: str, key_path: str | os.PathLike[str], context: str) -> ConfigRecord:
    """What a device puts under :data:`LEDGER_HEAD` in a reply: one call for the ClientApp."""
    return sign_head(ledger, client_id, signing_key(key_path), context).to_record()


def check_heads(rows: Sequence[LedgerRow], heads: Iterable[SignedHead]) -> list[str]:
    """How the ledger ``rows`` contradict the signed ``heads`` a server recorded (empty: none).

    Each head must verify, all heads of one client must come from one key, and the ledger must
    still hold the signed row at the signed position: fewer rows is a truncation, another hash
    a rewrite (of that row or of any before it, through the chain).
    """
    problems: list[str] = []
    keys: dict[str, set[str]] = {}
    for head in heads:
        try:
            head.verify()
        except LedgerIntegrityError as exc:
            problems.append(str(exc))
            continue
        keys.setdefault(head.client_id, set()).add(head.public_key)
        if head.rows == 0:
            continue
        where = f"client {head.client_id!r} signed {head.rows} row(s) at {head.context}"
        if len(rows) < head.rows:
            problems.append(f"{where}, but the ledger now holds {len(rows)}: it was truncated since")
        elif rows[head.rows - 1].row_hash != head.head:
            problems.append(
                f"{where} ending in {head.head[:16]}..., but row {head.rows} now hashes to "
                f"{rows[head.rows - 1].row_hash[:16]}...: the ledger was rewritten since"
            )
    for client_id, signers in sorted(keys.items()):
        if len(signers) > 1:
            problems.append(f"client {client_id!r}'s heads are signed by {len(signers)} different keys")
    return problems


def recorded_heads(paths: Iterable[Path]) -> list[SignedHead]:
    """Every signed head a server recorded in the round logs (``metrics.jsonl``, its
    ``ledger-heads``) at ``paths``: the files, or run directories, server homes and simulation
    outputs searched for them."""
    heads: list[SignedHead] = []
    for file in _metrics_files(paths):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                heads += [SignedHead.from_json(head) for head in json.loads(line).get("ledger-heads", {}).values()]
            except (ValueError, AttributeError, ProtocolError) as exc:
                raise LedgerIntegrityError(f"{file} line {number} is not a fedvox round record: {exc}") from None
    return heads


def _metrics_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(path.rglob(METRICS_FILE))
            if not found:
                raise LedgerIntegrityError(f"no {METRICS_FILE} under {path}; pass a server run directory or home")
            files += found
        else:
            raise LedgerIntegrityError(f"{path}: no such file or folder of signed ledger heads")
    return list(dict.fromkeys(files))


__all__ = [
    "LEDGER_HEAD",
    "METRICS_FILE",
    "SIGNING_KEY_FILE",
    "SignedHead",
    "check_heads",
    "head_record",
    "recorded_heads",
    "sign_head",
    "signing_key",
]
