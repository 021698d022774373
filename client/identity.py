"""A data folder's privacy identity: the client id its ledger rows are charged to.

Every release made from one folder of prepared recordings — local training, any federated run —
is charged to the same ``client_id`` in the same ledger, so its budget covers all uses of that
data. The id is random (it identifies the folder, not the person) and created once.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from fedvox.shared.atomic import atomic_write_text
from fedvox.shared.errors import DataError

IDENTITY_FILE = "identity.json"


def client_identity(data_dir: str | Path) -> str:
    """The folder's client id, created on first use."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass the --out folder of `fedvox-client prepare`")
    path = folder / IDENTITY_FILE
    if path.is_file():
        try:
            return str(json.loads(path.read_text())["client_id"])
        except (ValueError, KeyError) as exc:
            raise DataError(f"{path} is damaged ({exc}); restore it from a backup: the privacy ledger refers to it") from exc
    candidate = folder / f".{IDENTITY_FILE}.{secrets.token_hex(4)}"
    atomic_write_text(candidate, json.dumps({"client_id": f"client-{secrets.token_hex(6)}"}) + "\n")
    try:
        os.link(candidate, path)  # fails if another process created it first: theirs wins
    except FileExistsError:
        pass
    finally:
        candidate.unlink(missing_ok=True)
    return client_identity(folder)
