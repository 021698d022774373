"""What ``fedvox-audit canary`` prints: the bounds beside the accountant's epsilon, and their meaning."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from fedvox.client.canary.run import NO_POWER, WHITE_BOX, CanaryAudit, CanaryResult
from fedvox.shared.privacy.audit_report import format_epsilon, json_safe

MEANING = (
    "The lower bound is what the canaries prove: at {confidence:g}% confidence (for all kinds "
    "together: each kind's bound is at its share of the error), no training that "
    "lets them be told apart this well is (epsilon, delta)-DP for any epsilon below it. The "
    "accountant's epsilon is the proof from the other side, so the truth lies between them. A lower "
    "bound above the accountant's epsilon means the implementation leaks more than it accounts "
    "for; one far below it does not mean the training is more private than accounted (the "
    "canaries may just be weak), only that nothing contradicts the accountant."
)

CAP_NOTE = (
    "cap: the bound if all of the most guesses tried were right, the most these canaries can "
    "show; it grows only with the logarithm of their number."
)


def render(audit: CanaryAudit, console: Console) -> None:
    """The table, the mechanism it was trained with, the scores, the findings, the meaning."""
    spec = audit.spec
    console.print(_table(audit))
    console.print(CAP_NOTE, highlight=False)
    expected = spec.sample_rate * audit.training_examples
    console.print(
        f"mechanism: noise_multiplier {spec.noise_multiplier:g}, sample rate {spec.sample_rate:g} over "
        f"{audit.data_examples} utterances + {audit.training_examples - audit.data_examples} IN canaries "
        f"(expected batch {expected:.1f}), {spec.steps} steps, clip norm {spec.clip_norm:g}, delta "
        f"{spec.delta:g}; accountant epsilon {format_epsilon(audit.epsilon)} (the run's ledger, {spec.accountant}), "
        f"dp-accounting PLD {format_epsilon(audit.epsilon_pld)}; certified: the smaller",
        highlight=False,
    )
    for result in audit.results:
        best = result.bound.best
        console.print(
            f"{result.kind} score: {result.score}; mean IN {result.mean_score_in:.3g}, mean OUT "
            f"{result.mean_score_out:.3g}; best guesses: top {best.k} IN and bottom {best.k} OUT, "
            f"{best.correct} of {best.guesses} right",
            highlight=False,
        )
    console.print(
        f"s1 {spec.model_config}, seed {audit.seed}; trained in {audit.timings['training_s']:.1f} s "
        f"({1000 * audit.timings['step_s']:.0f} ms per step), {audit.timings['total_s']:.1f} s in all",
        highlight=False,
    )
    for finding in audit.findings:
        console.print(f"[bold red]{finding.kind}[/]: {finding.message}", highlight=False)
    console.print()
    console.print(MEANING.format(confidence=100 * spec.confidence), highlight=False)
    if spec.noise_multiplier == 0:
        console.print(
            "DP is off (noise 0): the accountant's epsilon is infinite, and this run checks that the "
            "audit can see canaries at all (white-box: at least half the cap).",
            highlight=False,
        )
    if audit.findings:
        console.print(f"[bold red]audit FAILED[/]: {len(audit.findings)} finding(s)")
    else:
        console.print("[bold green]audit passed[/]")


def _table(audit: CanaryAudit) -> Table:
    spec = audit.spec
    title = f"canary audit (one run, {100 * spec.confidence:g}% confidence)"
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold")
    for name in ("canaries", "count", "IN", "guesses", "right", "ε lower bound", "cap", "certified ε", "status"):
        table.add_column(name, justify="left" if name in ("canaries", "status") else "right")
    for result in audit.results:
        table.add_row(
            result.kind,
            str(result.canaries),
            str(result.included),
            str(result.bound.best.guesses),
            str(result.bound.best.correct),
            f"{result.bound.epsilon:.3f}",
            f"{result.bound.cap:.3f}",
            format_epsilon(audit.theoretical_epsilon),
            _status(audit, result),
        )
    return table


def _status(audit: CanaryAudit, result: CanaryResult) -> str:
    if audit.spec.noise_multiplier > 0:
        return "[bold red]VIOLATION[/]" if result.bound.epsilon > audit.theoretical_epsilon else "ok"
    if result.kind == WHITE_BOX and any(f.kind == NO_POWER for f in audit.findings):
        return "[bold red]no power[/]"
    return "ok (DP off)"


def to_json(audit: CanaryAudit) -> dict[str, Any]:
    """Machine-readable audit; non-finite numbers are written as the string ``"inf"``."""
    return json_safe(
        {
            "ok": audit.ok,
            "seed": audit.seed,
            "settings": asdict(audit.spec),
            "data_examples": audit.data_examples,
            "training_examples": audit.training_examples,
            "epsilon": audit.epsilon,
            "epsilon_pld": audit.epsilon_pld,
            "theoretical_epsilon": audit.theoretical_epsilon,
            "canaries": [_result(r) for r in audit.results],
            "findings": [{"kind": f.kind, "message": f.message} for f in audit.findings],
            "timings": dict(audit.timings),
        }
    )


def _result(result: CanaryResult) -> dict[str, Any]:
    bound = result.bound
    return {
        "kind": result.kind,
        "canaries": result.canaries,
        "included": result.included,
        "score": result.score,
        "mean_score_in": result.mean_score_in,
        "mean_score_out": result.mean_score_out,
        "epsilon_lower_bound": bound.epsilon,
        "confidence": bound.confidence,
        "cap": bound.cap,
        "best": {"k": bound.best.k, "guesses": bound.best.guesses, "correct": bound.best.correct},
        "sweep": [{"k": g.k, "guesses": g.guesses, "correct": g.correct, "epsilon": g.epsilon} for g in bound.sweep],
    }


__all__ = ["render", "to_json"]
