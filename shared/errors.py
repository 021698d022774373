"""Exception types users see.

Every error fedvox raises on bad input is a :class:`FedvoxError`: its message says what went
wrong, where, and how to fix it, so command-line tools can print it as one line and exit.
"""


class FedvoxError(Exception):
    """Base class: an error a user can act on (bad input, missing file, refused request)."""


class Interrupted(FedvoxError):
    """The user stopped a command (Ctrl-C); the message says how to continue."""


class ConfigError(FedvoxError):
    """A configuration value is missing, unknown or out of range."""


class CheckpointError(FedvoxError):
    """A checkpoint cannot be read, does not match the model, or cannot be written."""


class DataError(FedvoxError):
    """Input data (a list file, audio, a feature cache) is unusable."""


class TextError(DataError):
    """Text cannot be turned into phoneme ids (empty, unsupported language, unphonemizable).

    ``reason`` is machine-readable: ``"empty_text"``, ``"unsupported_language"`` or
    ``"unphonemizable_text"``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PrivacyError(FedvoxError):
    """A privacy invariant would be violated (ledger, accountant)."""


class BudgetExceededError(PrivacyError):
    """Training would take a client past its epsilon budget; nothing was trained or charged."""


class LedgerIntegrityError(PrivacyError):
    """A privacy ledger is malformed or has been tampered with."""


class DeviceError(FedvoxError):
    """The device cannot run what was asked (unsupported backend, out of memory)."""


class UpdateRejected(FedvoxError):
    """A client update failed validation (keys, shapes, dtypes, finite values, norm)."""


class ProtocolError(FedvoxError):
    """A federation message does not follow the fedvox protocol (missing or mistyped record)."""


class FederationError(FedvoxError):
    """A federated run cannot go on (too few clients connected or able to train)."""


class DeploymentError(FedvoxError):
    """A real federation cannot be set up or joined (server home, certificates, devices)."""


class ServerUnreachable(DeploymentError):
    """The fedvox server does not answer at the given address (down, wrong address, network)."""


class CertificateMismatch(DeploymentError):
    """The server's TLS certificate is not signed by the given root certificate, or not for its name."""


class NotRegistered(DeploymentError):
    """The server does not know this device's public key: the operator has not registered it."""
