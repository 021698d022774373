"""The server's record of its devices' signed ledger heads (:mod:`shared.privacy.ledger_head`).

Every reply a device sends with its ledger open carries the ledger's row count and head hash,
signed with the device key. The server keeps, per round, the last head each client and device key signed
(in the round's checkpoint and ``metrics.jsonl`` line, ``ledger-heads``), so that a later
rewrite or truncation of that ledger is caught by ``fedvox-audit ledger --heads RUN_DIR``. The
server checks each signature when it arrives and keeps only heads that verify and name the
client that sent the reply; it does not refuse an update without one (the device's own
guarantee does not depend on the server's record), but counts it in ``ledger-heads-missing``.
"""

from __future__ import annotations

import logging

from flwr.app import Message

from fedvox.shared.errors import LedgerIntegrityError, ProtocolError
from fedvox.shared.privacy.ledger_head import LEDGER_HEAD, SignedHead

log = logging.getLogger(__name__)


def read_head(reply: Message, client_id: str) -> SignedHead | None:
    """The reply's signed ledger head if it verifies and is ``client_id``'s; ``None`` (logged) otherwise."""
    record = reply.content.config_records.get(LEDGER_HEAD)
    if record is None:
        return None
    try:
        head = SignedHead.from_json(record)
        head.verify()
    except (ProtocolError, LedgerIntegrityError) as exc:
        log.warning("node %d: ledger head not recorded: %s", reply.metadata.src_node_id, exc)
        return None
    if head.client_id != client_id:
        log.warning(
            "node %d: ledger head signed for %s in a reply from %s; not recorded",
            reply.metadata.src_node_id,
            head.client_id,
            client_id,
        )
        return None
    return head


__all__ = ["read_head"]
