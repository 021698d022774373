"""``fedvox-audit``: check privacy ledgers without trusting the code that wrote them.

``fedvox-audit LEDGER...`` is shorthand for ``fedvox-audit ledger LEDGER...``: any first argument
that is not a subcommand name is a ledger path, so further subcommands can join the group without
changing how the ledger audit is called. ``fedvox-audit canary DATA`` trains s1 with hidden
canaries and bounds its epsilon from below (``fedvox.client.canary``). Exit status: 0 when
nothing is flagged, 1 when anything is, 2 on unusable input.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.console import Console

from fedvox.client.canary.spec import CanaryAuditSpec
from fedvox.shared.cli import VERSION_OPTION, command_group, progress, run_cli, setup_logging
from fedvox.shared.errors import LedgerIntegrityError
from fedvox.shared.privacy.accounting import ACCOUNTANTS
from fedvox.shared.privacy.audit import DEFAULT_TOLERANCE, LedgerAudit, audit_ledger
from fedvox.shared.privacy.ledger import LEDGER_FILENAME, read_rows
from fedvox.shared.privacy.ledger_head import SignedHead, recorded_heads

app = command_group(
    "fedvox-audit",
    (
        "Audit privacy budgets. `fedvox-audit LEDGER...` (short for `fedvox-audit ledger "
        "LEDGER...`) recomputes every epsilon in the given ledgers; `fedvox-audit canary DATA` "
        "measures a training's privacy empirically."
    ),
)


@app.callback()
def _group(version: bool = VERSION_OPTION) -> None:
    """Audit privacy budgets: recompute every recorded epsilon, check ledgers for tampering."""


@app.command("ledger")
def ledger(
    ledgers: Annotated[
        list[Path],
        typer.Argument(
            help=f"Ledger files, or folders searched for {LEDGER_FILENAME} (a simulation's output).",
            show_default=False,
        ),
    ],
    delta: Annotated[
        float | None, typer.Option(help="Recompute epsilon at this delta (default: each ledger's own).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="Epsilon budget for every client and unit (default: the recorded ones).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the audit as JSON instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write PNG plots of epsilon over rounds into this folder.")] = None,
    tolerance: Annotated[
        float, typer.Option(help="Allowed shortfall of a recorded epsilon (relative; absolute below 1).")
    ] = DEFAULT_TOLERANCE,
    heads: Annotated[
        list[Path] | None,
        typer.Option(
            help="A server run directory or home (repeat): hold each ledger against the heads its device signed there.",
        ),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(help="Check these client ids' signed heads even if the ledgers no longer hold any of their rows."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    """Check privacy ledgers and recompute every epsilon in them.

    Checks each ledger is intact and append-only, recomputes every client's and unit's epsilon
    with dp-accounting (PLD, RDP) beside Opacus, and flags under-reported epsilons, budget
    overruns and mechanisms it cannot account. With --heads, also flags a ledger that no longer
    holds the rows its device signed for (rewritten or truncated since). Exit status 1 when
    anything is flagged.
    """
    from fedvox.shared.privacy.audit_plots import plot_accounts
    from fedvox.shared.privacy.audit_report import render, to_json

    setup_logging(verbose)
    if not verbose:
        # dp-accounting's RDP warns for every order its series cannot evaluate (large sample
        # rates); it drops that order, which only loosens its bound. Not news for an auditor.
        logging.getLogger("absl").setLevel(logging.ERROR)
    files = _ledger_files(ledgers)
    signed = recorded_heads(heads) if heads else []
    audits: list[LedgerAudit] = []
    with progress() as bar:
        task = bar.add_task("auditing ledgers", total=len(files))
        for file in files:
            bar.update(task, description=f"auditing {file.parent.name}/{file.name}")
            audits.append(
                audit_ledger(
                    file,
                    delta=delta,
                    budget=budget,
                    tolerance=tolerance,
                    on_account=lambda a: bar.update(task, description=f"auditing {a.client_id} ({a.unit})"),
                    heads=_heads_of(file, signed, client or []),
                )
            )
            bar.advance(task)
    out = _console()
    audited = {row.client_id for file in files for row in read_rows(file)} | set(client or [])
    if unmatched := sorted({head.client_id for head in signed} - audited):
        out.print(f"{len(unmatched)} client(s) with signed heads in --heads are in none of these ledgers (not checked)")
    if json_output:
        out.print_json(json.dumps(to_json(audits, delta=delta, tolerance=tolerance)))
    else:
        render(audits, out)
    if plot is not None:
        written = plot_accounts([account for audit in audits for account in audit.accounts], plot)
        if not json_output:
            out.print(f"wrote {len(written)} plot(s) to {plot}")
    if any(audit.all_findings for audit in audits):
        raise typer.Exit(1)


# The spec's defaults, read without building one (building checks the device, which loads torch).
_DEFAULTS = SimpleNamespace(**{f.name: f.default for f in fields(CanaryAuditSpec)})


@app.command("canary")
def canary(
    data: Annotated[
        Path,
        typer.Argument(help="A prepared feature cache (`fedvox-client prepare`) to train s1 on.", show_default=False),
    ],
    white_box: Annotated[
        int, typer.Option(help="Gradient canaries injected in the DP optimizer (0: none).")
    ] = _DEFAULTS.white_box,
    black_box: Annotated[
        int, typer.Option(help="Random-token s1 examples hidden in the data (0: none).")
    ] = _DEFAULTS.black_box,
    noise_multiplier: Annotated[
        float, typer.Option(help="DP-SGD noise; 0 turns DP off (the audit's control).")
    ] = _DEFAULTS.noise_multiplier,
    sample_rate: Annotated[
        float, typer.Option(help="Poisson rate for every example, data and canaries alike.")
    ] = _DEFAULTS.sample_rate,
    steps: Annotated[int, typer.Option(help="DP-SGD steps.")] = _DEFAULTS.steps,
    clip_norm: Annotated[float, typer.Option(help="Per-example clip norm.")] = _DEFAULTS.clip_norm,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = _DEFAULTS.learning_rate,
    delta: Annotated[float, typer.Option(help="Delta of the accountant's epsilon and of the bound.")] = _DEFAULTS.delta,
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound.")] = _DEFAULTS.confidence,
    accountant: Annotated[
        str, typer.Option(help=f"Accountant of the run's ledger ({', '.join(ACCOUNTANTS)}).")
    ] = _DEFAULTS.accountant,
    model_config: Annotated[str, typer.Option(help="s1 model config (tiny, v1, v2, ...).")] = _DEFAULTS.model_config,
    pretrained: Annotated[
        Path | None, typer.Option(help="Start from this GPT-SoVITS s1 checkpoint instead of random weights.")
    ] = None,
    physical_batch: Annotated[
        int, typer.Option(help="Examples per forward pass (changes speed, not results).")
    ] = _DEFAULTS.physical_batch,
    device: Annotated[str, typer.Option(help="Torch device to train on.")] = _DEFAULTS.device,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Fix canaries, sampling and noise (default: random, reported).")
    ] = None,
    ledger: Annotated[
        Path | None, typer.Option(help="Keep the audit run's privacy ledger in this folder (default: discarded).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the audit as JSON instead of tables.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    """Train s1 with hidden canaries and bound its epsilon from below (one-run audit).

    Each canary is IN with probability 1/2. White-box canaries add a full-norm gradient on a
    coordinate of their own inside the DP step; black-box canaries are random-token training
    examples. Their scores become an epsilon lower bound (Steinke, Nasr, Jagielski 2023) shown
    beside the accountant's epsilon for the same run. Exit status 1 when a bound exceeds the
    accountant's epsilon, or when, without noise, the white-box canaries cannot be seen.
    """
    import torch  # training libraries load only when a canary audit runs

    from fedvox.client.canary import report as canary_report
    from fedvox.client.canary.run import run_canary_audit

    setup_logging(verbose)
    if not verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)
    spec = CanaryAuditSpec(
        white_box=white_box,
        black_box=black_box,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        clip_norm=clip_norm,
        learning_rate=learning_rate,
        delta=delta,
        confidence=confidence,
        accountant=accountant,
        model_config=model_config,
        pretrained=str(pretrained) if pretrained else None,
        physical_batch=physical_batch,
        device=device,
    )
    with progress() as bar:
        task = bar.add_task("training with canaries", total=steps)
        audit = run_canary_audit(data, spec, seed=seed, ledger_dir=ledger, on_step=lambda: bar.advance(task))
    out = _console()
    if json_output:
        out.print_json(json.dumps(canary_report.to_json(audit)))
    else:
        canary_report.render(audit, out)
    if not audit.ok:
        raise typer.Exit(1)


def _console() -> Console:
    out = Console()
    if not out.is_terminal:  # piped: wide enough for the table, no terminal to fit
        out = Console(width=160)
    return out


def _heads_of(file: Path, heads: list[SignedHead], clients: list[str]) -> list[SignedHead]:
    """The signed heads of the clients ``file`` holds rows of, or that ``--client`` names."""
    mine = {row.client_id for row in read_rows(file)} | set(clients)
    return [head for head in heads if head.client_id in mine]


def _ledger_files(paths: list[Path]) -> list[Path]:
    """Each path as a ledger file; a folder without one directly inside is searched recursively."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif (path / LEDGER_FILENAME).is_file():
            files.append(path / LEDGER_FILENAME)
        elif path.is_dir():
            found = sorted(path.rglob(LEDGER_FILENAME))
            if not found:
                raise LedgerIntegrityError(f"no {LEDGER_FILENAME} under {path}; pass a ledger file or its folder")
            files.extend(found)
        else:
            raise LedgerIntegrityError(f"no privacy ledger at {path}: the path does not exist")
    return list(dict.fromkeys(files))


def route(args: list[str]) -> list[str]:
    """Arguments for the command group: a leading non-subcommand means ``ledger``."""
    commands = {command.name for command in app.registered_commands}
    if args and args[0] not in commands and args[0] not in ("--help", "-h", "--version"):
        return ["ledger", *args]
    return args


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = route(list(sys.argv[1:] if argv is None else argv))
    run_cli(app, args, prog_name="fedvox-audit")
