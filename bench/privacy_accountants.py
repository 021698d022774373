"""Accountant speed and agreement on long histories (the figures in docs/privacy.md).

    python -m bench.privacy_accountants --rounds 100 --steps 50

A client's history is ``rounds`` releases of ``steps`` DP-SGD steps at sample rate ``q``. Two
shapes: the same noise every round (Opacus and fedvox merge it into one entry), and noise
re-calibrated every round (every entry distinct, the worst case for PRV and PLD). Prints one
JSON object: epsilon and seconds per accountant, cold caches, one run each.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import dp_accounting
import numpy as np
import typer
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedvox.shared.cli import run_cli
from fedvox.shared.privacy import accounting
from fedvox.shared.privacy.accounting import Mechanism, calibrate_noise_multiplier

app = typer.Typer(add_completion=False)


def _timed(run):
    start = time.perf_counter()
    value = run()
    return {"epsilon": round(float(value), 4), "seconds": round(time.perf_counter() - start, 3)}


def _cold() -> None:
    accounting._epsilon.cache_clear()
    accounting._rdp_curve.cache_clear()


def _google(history: list[Mechanism], delta: float, accountant) -> float:
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
                m.steps,
            )
            for m in history
        ]
    )
    return accountant.compose(event).get_epsilon(delta)


@app.command()
def main(
    rounds: Annotated[int, typer.Option(help="Releases in the history.")] = 100,
    steps: Annotated[int, typer.Option(help="DP-SGD steps per release.")] = 50,
    sample_rate: Annotated[float, typer.Option(help="Poisson sample rate.")] = 0.01,
    delta: Annotated[float, typer.Option(help="Target delta.")] = 1e-5,
) -> None:
    rng = np.random.default_rng(0)
    shapes = {
        "same noise every round": [Mechanism(1.0, sample_rate, steps)] * rounds,
        "noise calibrated every round": [
            Mechanism(float(1.0 + 0.2 * rng.random()), sample_rate, steps) for _ in range(rounds)
        ],
    }
    report: dict[str, object] = {"rounds": rounds, "steps": steps, "sample_rate": sample_rate, "delta": delta}
    for name, history in shapes.items():
        row = {}
        for accountant in ("prv", "rdp"):
            _cold()
            row[f"opacus {accountant}"] = _timed(lambda a=accountant, h=history: accounting.epsilon(h, delta, a))
        for label, make in (
            (
                "dp-accounting pld 1e-4",
                lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4),
            ),
            (
                "dp-accounting pld 1e-3",
                lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3),
            ),
            ("dp-accounting rdp", rdp_privacy_accountant.RdpAccountant),
        ):
            row[label] = _timed(lambda m=make, h=history: _google(h, delta, m()))
        report[name] = row
    prior = shapes["noise calibrated every round"][: rounds // 5]
    for accountant in ("prv", "rdp"):
        _cold()
        spent = accounting.epsilon(prior, delta, accountant)
        report[f"calibrate {accountant} after {len(prior)} distinct rounds"] = _timed(
            lambda a=accountant, s=spent: calibrate_noise_multiplier(
                s + 1.0, delta, sample_rate=sample_rate, steps=steps, history=prior, accountant=a
            )
        ) | {"note": "epsilon field is the noise multiplier found"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_cli(app)
