"""The report's figures (matplotlib, Agg backend: no display needed), each written atomically.

Every function takes plain numbers (``simulations.report`` collects them) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedvox.shared.atomic import atomic_path  # noqa: E402

Series = Mapping[int, float]
"""A value per round."""

OUTCOME_COLOURS = {"ok": "tab:green", "straggler": "tab:orange", "dropout": "tab:red", "refused": "tab:purple",
                   "error": "tab:gray"}


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


def loss_curves(path: Path, curves: Mapping[str, Mapping[str, Series]], ylabel: str) -> Path:
    """One panel per group (``seen``, ``unseen``); one line per model (global, local-only, ...)."""
    groups = [g for g in ("seen", "unseen") if any(curves.get(g, {}).values())]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5.5 * max(len(groups), 1), 3.8), squeeze=False)
    styles = {"global (federated)": {"color": "tab:blue", "linewidth": 2},
              "local only (same privacy)": {"color": "tab:orange", "linestyle": "--"},
              "centralised, non-private": {"color": "tab:green", "linestyle": ":"}}
    for ax, group in zip(axes[0], groups, strict=False):
        for label, series in curves[group].items():
            _line(ax, series, label, **styles.get(label, {}))
        ax.set(title=f"{group} speakers (held-out utterances)", xlabel="round", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def epsilon_curves(path: Path, utterance: Mapping[str, Series], speaker: Mapping[str, Series],
                   groups: Mapping[str, str]) -> Path:
    """Cumulative epsilon per client over rounds, utterance level (and speaker level if any);
    ``groups`` maps a client to its device class (one colour each)."""
    colour = {g: f"C{k}" for k, g in enumerate(sorted(set(groups.values())))}
    panels = [("utterance level (per client, DP-SGD)", utterance)]
    if speaker:
        panels.append(("speaker level (server, DP-FedAvg)", speaker))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        seen_labels = set()
        for client, values in series.items():
            group = groups.get(client, "")
            label = group if group not in seen_labels else None
            seen_labels.add(group)
            _line(ax, values, label, color=colour.get(group, "tab:gray"), alpha=0.8)
        ax.set(title=title, xlabel="round", ylabel="cumulative epsilon")
        ax.grid(alpha=0.3)
        if seen_labels - {""}:
            ax.legend(fontsize=7, title="device class", title_fontsize=7)
    return _save(fig, path)


def system(path: Path, step_times: Mapping[str, Sequence[float]], round_times: Mapping[int, tuple[float, float]],
           bytes_per_client: Mapping[int, tuple[float, float]], outcomes: Mapping[int, Mapping[str, int]]) -> Path:
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


def privacy_utility(path: Path, points: Mapping[str, Sequence[tuple[float, float]]],
                    references: Mapping[str, float], ylabel: str) -> Path:
    """Final loss against the runs' utterance-level epsilon; horizontal lines for references."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in points.items():
        values = sorted(v for v in values if v[1] is not None)
        if values:
            ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=label)
    for k, (label, value) in enumerate(references.items()):
        ax.axhline(value, color=f"C{k + 4}", linestyle=":", label=label)
    ax.set(xscale="log", xlabel="utterance-level epsilon per client (target over the run)", ylabel=ylabel,
           title="privacy-utility")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


__all__ = ["epsilon_curves", "loss_curves", "privacy_utility", "system"]
