"""Only the server home's owner may call the SuperLink's Control API.

The Control API registers device keys, starts and stops runs (runs are code the server executes)
and streams the ServerApp's log. The SuperLink listens on 127.0.0.1 only, but every local
account reaches loopback, and open-source Flower 1.41 authenticates nobody there: account
authentication (OIDC) is a Flower Enterprise plugin. Flower does define the plugin interface
(:class:`ControlAuthnPlugin`, checked by the SuperLink's Control middleware on every
``/v1/control/`` request), so fedvox plugs in its own: a random token in
``DIR/state/control.token`` (0600, in the 0700 home), sent as ``Authorization: Bearer``. A call
without it, or with another, gets Flower's 401 before any handler runs.

The SuperLink gets the plugin by starting through :func:`main` (``python -m
fedvox.server.deploy.control_auth``, Flower's own ``flower-superlink`` with its arguments),
which reads the token from the file :data:`TOKEN_FILE_ENV` names: never on a command line,
which every local account can read in ``/proc``. The Runtime API on the same port (the ServerApp's
own connection) is not covered: see docs/privacy.md.
"""

from __future__ import annotations

import hmac
import importlib
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.interceptors.http.utils import add_headers
from flwr.supercore.protobuf.client import ProtobufCall, ProtobufRequestContext
from flwr.superlink.auth_plugin import ControlAuthnPlugin

from fedvox.shared.atomic import atomic_path
from fedvox.shared.errors import DeploymentError

TOKEN_FILE_ENV = "FEDVOX_CONTROL_TOKEN_FILE"
OWNER = AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
"""Open-source Flower has one account, which owns every run and node; the token decides who may act as it."""


def ensure_token(path: Path) -> str:
    """A secret of the home (the Control API token, the SuperExec secret), made on first use (0600)."""
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # mkstemp: 0600 from the start
            tmp.write_text(secrets.token_urlsafe(32) + "\n")
    return read_token(path)


def read_token(path: Path) -> str:
    """The secret in ``path``; refuses one that other accounts can read."""
    try:
        if path.stat().st_mode & 0o077:
            raise DeploymentError(f"{path} is readable by other accounts; run `chmod 600 {path}`")
        token = path.read_text().strip()
    except OSError as exc:
        raise DeploymentError(
            f"cannot read {path} ({exc.strerror}); only the server home's owner can control its server: "
            "run this as that account"
        ) from None
    if not token:
        raise DeploymentError(f"{path} is empty; delete it and start the server again to make a new token")
    return token


class HomeTokenAuthn(ControlAuthnPlugin):
    """Flower's Control authentication plugin, accepting only the home's token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        return None  # no interactive login: the token is a file in the home

    def validate_tokens_in_metadata(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[bool, AccountInfo | None]:
        sent = [value for key, value in metadata if key == ACCESS_TOKEN_KEY]
        if len(sent) != 1:
            return False, None
        value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
        valid = hmac.compare_digest(value, self._token.encode())
        return (True, OWNER) if valid else (False, None)

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "this SuperLink takes the fedvox server home's token only")

    def refresh_tokens(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[Sequence[tuple[str, str | bytes]] | None, AccountInfo | None]:
        valid, account = self.validate_tokens_in_metadata(metadata)
        return (metadata, account) if valid else (None, None)


class BearerToken:
    """Control API client interceptor: every request carries the home's token."""

    def __init__(self, token: str) -> None:
        self._header = {"Authorization": f"Bearer {token}"}

    def intercept(self, context: ProtobufRequestContext, call_next: ProtobufCall) -> httpx.Response:
        add_headers(context.request, self._header)
        return call_next(context)


def main() -> None:
    """``flower-superlink`` with :class:`HomeTokenAuthn` (arguments as Flower's own command)."""
    superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module, not its function
    token_file = os.environ.get(TOKEN_FILE_ENV)
    if not token_file:
        sys.exit(f"{TOKEN_FILE_ENV} must name the server home's Control API token file")
    try:
        token = read_token(Path(token_file))
    except DeploymentError as exc:
        sys.exit(str(exc))
    superlink.load_control_authn_plugin = lambda: HomeTokenAuthn(token)
    superlink.flower_superlink()


if __name__ == "__main__":
    main()


__all__ = ["TOKEN_FILE_ENV", "BearerToken", "HomeTokenAuthn", "ensure_token", "main", "read_token"]
