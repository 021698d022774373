"""The report's figures (matplotlib, Agg backend: no display needed), each written atomically.

Every function takes plain numbers (``simulations.report`` collects them) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedvox.shared.atomic import atomic_path

Series = Mapping[int, float]
"""A value per round."""

SERIES_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
    "navy",
    "gold",
)
"""Distinct colours, one per series (a model, a client)."""
REFERENCE_COLOURS = ("dimgray", "darkgoldenrod", "darkviolet")
LINE_STYLES = ("-", "--", ":", "-.")
OUTCOME_COLOURS = {
    "ok": "tab:green",
    "straggler": "tab:orange",
    "dropout": "tab:red",
    "refused": "tab:purple",
    "error": "tab:gray",
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _line(ax, series: Series, label: str | None, **style) -> None:
    rounds = sorted(r for r, v in series.items() if v is not None and math.isfinite(v))
    if rounds:
        ax.plot(rounds, [series[r] for r in rounds], marker="o", label=label, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def loss_curves(
    path: Path,
    curves: Mapping[str, Mapping[str, Series]],
    ylabel: str,
    references: Mapping[str, Mapping[str, float | None]] | None = None,
) -> Path:
    """One panel per group (``seen``, ``unseen``); one line per model (global, local-only, ...);
    ``references`` (name -> group -> loss, e.g. a uniform guess) are horizontal lines."""
    groups = [g for g in ("seen", "unseen") if any(curves.get(g, {}).values())]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5.5 * max(len(groups), 1), 3.8), squeeze=False)
    styles = {
        "global (federated)": {"color": "tab:blue", "linewidth": 2},
        "local only (same privacy)": {"color": "tab:orange", "linestyle": "--"},
        "centralised, non-private": {"color": "tab:green", "linestyle": ":"},
    }
    for ax, group in zip(axes[0], groups, strict=False):  # no group: one empty panel
        for k, (label, series) in enumerate(curves[group].items()):
            _line(ax, series, label, **styles.get(label, {"color": SERIES_COLOURS[k % len(SERIES_COLOURS)]}))
        for k, (name, levels) in enumerate((references or {}).items()):
            if levels.get(group) is not None:
                ax.axhline(
                    levels[group],
                    color=REFERENCE_COLOURS[k % len(REFERENCE_COLOURS)],
                    linestyle="-.",
                    linewidth=1,
                    label=f"reference: {name}",
                )
        ax.set(title=f"{group} speakers (held-out utterances)", xlabel="round", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def epsilon_curves(
    path: Path,
    utterance: Mapping[str, Series],
    speaker: Mapping[str, Series],
    groups: Mapping[str, str],
    target: float | None = None,
    budget: float | None = None,
) -> Path:
    """Cumulative epsilon per client over rounds, utterance level (and speaker level if any): one
    colour per client, one line style per device class (``groups``); the run's target epsilon and
    the clients' budget as horizontal lines on the utterance-level panel."""
    styles = {g: LINE_STYLES[k % len(LINE_STYLES)] for k, g in enumerate(sorted(set(groups.values())))}
    colour = {c: SERIES_COLOURS[k % len(SERIES_COLOURS)] for k, c in enumerate(sorted(groups))}
    panels = [("utterance level (per client, DP-SGD)", utterance)]
    if speaker:
        panels.append(("speaker level (server, DP-FedAvg)", speaker))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for k, (ax, (title, series)) in enumerate(zip(axes[0], panels, strict=True)):
        for client, values in sorted(series.items()):
            group = groups.get(client, "")
            _line(
                ax,
                values,
                f"{client} ({group})" if group else client,
                color=colour.get(client, "tab:gray"),
                linestyle=styles.get(group, "-"),
                alpha=0.9,
            )
        if k == 0 and target:
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
        if k == 0 and budget:
            ax.axhline(budget, color="tab:red", linestyle=":", linewidth=1.5, label=f"budget {budget:g}")
        ax.set(title=title, xlabel="round", ylabel="cumulative epsilon")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def speech_quality(
    path: Path,
    series: Mapping[str, Mapping[str, Mapping[str, Any]]],
    metric_names: Mapping[str, str],
    labels: Mapping[str, str],
) -> Path:
    """One panel per metric: each model's mean with its confidence interval as an error bar, one
    group of bars per speaker set (the recordings' bar is the ceiling, the base model's the floor)."""
    metrics = list(metric_names)
    models = list(dict.fromkeys(m for levels in series.values() for m in levels))
    groups = list(series)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.4), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, model in enumerate(models):
            xs, ys, low, high = [], [], [], []
            for g, group in enumerate(groups):
                estimate = series[group].get(model, {}).get(metric)
                if estimate is not None:
                    xs.append(g - 0.4 + width * (k + 0.5))
                    ys.append(estimate.mean)
                    low.append(estimate.mean - estimate.low)
                    high.append(estimate.high - estimate.mean)
            if xs:
                ax.bar(
                    xs,
                    ys,
                    width,
                    yerr=[low, high],
                    capsize=3,
                    color=SERIES_COLOURS[k % len(SERIES_COLOURS)],
                    label=labels.get(model, model),
                )
        ax.set_xticks(range(len(groups)), [g.replace(" that ", "\nthat ") for g in groups], fontsize=7)
        ax.set_title(metric_names[metric], fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8)
    fig.suptitle("speech quality (mean over speakers, 95 % bootstrap interval)", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def system(
    path: Path,
    step_times: Mapping[str, Sequence[float]],
    round_times: Mapping[int, tuple[float, float]],
    bytes_per_client: Mapping[int, tuple[float, float]],
    outcomes: Mapping[int, Mapping[str, int]],
) -> Path:
    """Step time per device class; simulated vs real round time; bytes per client; outcomes."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    names = sorted(step_times)
    ax.boxplot([step_times[n] for n in names], tick_labels=names, showfliers=False)
    ax.set(title="DP step time on this host, by simulated device", ylabel="seconds per step")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[0][1]
    rounds = sorted(round_times)
    width = 0.38
    ax.bar([r - width / 2 for r in rounds], [round_times[r][0] for r in rounds], width, label="simulated fleet")
    ax.bar([r + width / 2 for r in rounds], [round_times[r][1] for r in rounds], width, label="real (this host)")
    ax.set(title="round time", xlabel="round", ylabel="seconds", xticks=rounds)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1][0]
    rounds = sorted(bytes_per_client)
    ax.bar([r - width / 2 for r in rounds], [bytes_per_client[r][0] / 1e3 for r in rounds], width, label="down")
    ax.bar([r + width / 2 for r in rounds], [bytes_per_client[r][1] / 1e3 for r in rounds], width, label="up")
    ax.set(title="payload per training client", xlabel="round", ylabel="kB", xticks=rounds)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1][1]
    rounds = sorted(outcomes)
    bottom = [0] * len(rounds)
    for outcome, colour in OUTCOME_COLOURS.items():
        counts = [outcomes[r].get(outcome, 0) for r in rounds]
        if any(counts):
            ax.bar(rounds, counts, bottom=bottom, color=colour, label=outcome)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set(title="selected clients by outcome", xlabel="round", ylabel="clients", xticks=rounds)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def privacy_utility(
    path: Path, points: Mapping[str, Sequence[tuple[float, float]]], references: Mapping[str, float], ylabel: str
) -> Path:
    """Final loss against the runs' utterance-level epsilon; horizontal lines for references."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in points.items():
        values = sorted(v for v in values if v[1] is not None)
        if values:
            ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=label)
    for k, (label, value) in enumerate(references.items()):
        ax.axhline(value, color=f"C{k + 4}", linestyle=":", label=label)
    ax.set(
        xscale="log",
        xlabel="utterance-level epsilon per client (target over the run)",
        ylabel=ylabel,
        title="privacy-utility",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


__all__ = ["epsilon_curves", "loss_curves", "privacy_utility", "speech_quality", "system"]
