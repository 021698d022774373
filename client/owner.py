"""The device owner's privacy decisions: the budget and delta a client identity is held to.

They are the owner's, set on the device (``prepare``, ``enroll``, the owner's node config) and
kept in the ledger (:meth:`Ledger.set_owner_budget`), never taken from a server's plan. A plan is
only *checked* against them (:func:`check_plan`): one that asks for more is refused with the
reason, and nothing is trained or charged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fedvox.client.data.cache import FeatureCache
from fedvox.client.identity import bind_ledger, bound_ledger, identity
from fedvox.client.releases import answers_a_server
from fedvox.shared.errors import BudgetExceededError, ConfigError, PrivacyError
from fedvox.shared.privacy.accounting import epsilon as compose
from fedvox.shared.privacy.ledger import (
    DEFAULT_BUDGET_EPSILON,
    UNITS,
    Ledger,
    LedgerRow,
    OwnerBudget,
    default_delta,
    ledger_file,
    read_owner_budget,
    read_rows,
)
from fedvox.shared.runconfig import RunConfig

UNIT = UNITS[0]  # the owner's budget is the utterance-level one


def owner_budget(
    ledger: Ledger,
    client_id: str,
    num_examples: int | None = None,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
) -> OwnerBudget:
    """The owner's budget for ``client_id``: the ledger's, changed where the owner gives a value.

    A client with none yet gets ``epsilon`` (default :data:`DEFAULT_BUDGET_EPSILON`) at ``delta``
    (default :func:`default_delta` of its ``num_examples`` training utterances, needed only
    then), recorded now.
    Raises :class:`PrivacyError` if ``delta`` would change a delta its releases are accounted at.
    """
    current = ledger.owner_budget(client_id)
    if current is None and delta is None and num_examples is None:
        raise ConfigError("a first owner budget needs its delta, or the number of training utterances to choose one")
    wanted = OwnerBudget(
        client_id,
        epsilon if epsilon is not None else (current.epsilon if current else DEFAULT_BUDGET_EPSILON),
        delta if delta is not None else (current.delta if current else default_delta(num_examples or 0)),
    )
    if current is not None and (current.epsilon, current.delta) == (wanted.epsilon, wanted.delta):
        return current
    return ledger.set_owner_budget(wanted)


def prepared_budget(
    data_dir: str | Path, *, epsilon: float | None = None, delta: float | None = None, home: str | Path | None = None
) -> tuple[OwnerBudget, Path]:
    """Record the owner's budget for a prepared folder's recordings (``prepare``), and where.

    It goes to the recordings' one ledger (:func:`bind_ledger`): the one already recorded for
    them, else the data folder's. Unset values keep the recorded ones (else the defaults). Raises
    :class:`PrivacyError` if ``delta`` would change the delta of releases already made.
    """
    ledger = bound_ledger(data_dir, home) or Path(data_dir).expanduser().resolve()
    client_id = bind_ledger(data_dir, ledger, home)
    utterances = len(FeatureCache(data_dir).read_index().items)
    with Ledger(ledger) as book:
        try:
            return owner_budget(book, client_id, utterances, epsilon=epsilon, delta=delta), ledger
        except PrivacyError as exc:
            raise PrivacyError(f"--delta: {exc}") from None


def run_budget(
    data_dir: str | Path, *, epsilon: float | None = None, delta: float | None = None
) -> tuple[OwnerBudget, bool]:
    """The budget a local run on ``data_dir`` is held to, and whether it is a first one to record.

    Reads only (a refused run writes nothing). With an owner budget in the data folder's ledger,
    its delta is used and ``epsilon`` may only lower its epsilon for this run; raising it is the
    owner's act (``prepare --budget-epsilon``). Without one, the given values (else the defaults)
    become the owner's once the run is accepted. Raises :class:`ConfigError` otherwise.
    """
    utterances = len(FeatureCache(data_dir).read_index().items)  # first: it names a folder that is not one
    client_id = identity(data_dir).client_id
    recorded = read_owner_budget(data_dir, client_id)
    if recorded is None:
        return OwnerBudget(
            client_id,
            epsilon if epsilon is not None else DEFAULT_BUDGET_EPSILON,
            delta if delta is not None else default_delta(utterances),
        ), True
    where = ledger_file(data_dir)
    if delta is not None and delta != recorded.delta:
        raise ConfigError(
            f"--delta {delta:g} differs from the owner's delta {recorded.delta:g} for these recordings (in {where}); "
            "drop --delta: every release of the recordings is accounted at one delta"
        )
    if epsilon is not None and epsilon > recorded.epsilon:
        raise ConfigError(
            f"--budget-epsilon {epsilon:g} is above the owner's budget {recorded.epsilon:g} for these recordings "
            f"(in {where}); the owner raises it with `fedvox-client prepare LIST --out {data_dir} "
            f"--budget-epsilon {epsilon:g}`, or drop --budget-epsilon"
        )
    return (recorded if epsilon is None else replace(recorded, epsilon=epsilon)), False


@dataclass(frozen=True)
class Account:
    """Some of a client's utterance-level releases: how many, in how many runs, their epsilon together."""

    releases: int
    runs: int
    epsilon: float


@dataclass(frozen=True)
class BudgetReport:
    """What the owner of some recordings has allowed and spent (``fedvox-client budget``).

    ``federated`` is the federation account (releases made for server messages: what servers are
    told), ``local`` the owner's own ``train`` runs, ``total`` the ledger's figure for all of them,
    which is what the budget is checked against (composed, not summed: less than the sum).
    """

    client_id: str
    ledger: Path
    owner: OwnerBudget | None
    federated: Account
    local: Account
    total: float

    @property
    def remaining(self) -> float | None:
        return None if self.owner is None else max(self.owner.epsilon - self.total, 0.0)


def budget_report(data_dir: str | Path, home: str | Path | None = None) -> BudgetReport:
    """Read (never write) the owner's budget and spending for a prepared folder's recordings."""
    client_id = identity(data_dir).client_id
    ledger = bound_ledger(data_dir, home) or Path(data_dir).expanduser().resolve()
    file = ledger_file(ledger)
    owner = read_owner_budget(file, client_id)
    rows = [r for r in read_rows(file) if r.client_id == client_id and r.unit == UNIT] if file.is_file() else []

    def account(chosen: list[LedgerRow]) -> Account:
        if not chosen:
            return Account(0, 0, 0.0)
        history = [row.to_mechanism() for row in chosen]
        total = compose(history, chosen[0].delta, chosen[0].accountant)
        return Account(len(chosen), len({row.run_id.split("/")[0] for row in chosen}), total)

    return BudgetReport(
        client_id,
        ledger,
        owner,
        account([r for r in rows if answers_a_server(r)]),
        account([r for r in rows if not answers_a_server(r)]),
        rows[-1].epsilon if rows else 0.0,
    )


def check_plan(owner: OwnerBudget, config: RunConfig) -> None:
    """Refuse a plan that asks a device for more epsilon than its owner allows."""
    asked = max(config.client_budget_epsilon, config.dp.target_epsilon)
    if asked > owner.epsilon:
        key = (
            "dp.target-epsilon" if config.dp.target_epsilon > config.client_budget_epsilon else "client-budget-epsilon"
        )
        raise BudgetExceededError(
            f"the plan asks this device for an utterance-level epsilon of {asked:g} ({key}); its owner allows "
            f"{owner.epsilon:g}. The operator must lower {key}, or the owner raise the budget on the device"
        )


__all__ = ["Account", "BudgetReport", "budget_report", "check_plan", "owner_budget", "prepared_budget", "run_budget"]
