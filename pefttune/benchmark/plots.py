"""Plots of a sweep: retrieval against trainable parameters, and training curves (PNG, no display)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pefttune.benchmark.aggregate import Group


def _pyplot() -> Any:
    import matplotlib

    # Sweeps run on headless machines; Agg needs no display.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    """One color per method, by sorted name, so that a method has the same color in every plot."""
    plt = _pyplot()
    palette = plt.get_cmap("tab10")
    return {method: palette(i % 10) for i, method in enumerate(sorted(set(methods)))}


def plot_retrieval_vs_params(groups: Sequence[Group], path: str | Path) -> Path:
    """Per dataset (rows): R@1 (image->text filled, text->image hollow) and RSUM against trainable params.

    The x axis is logarithmic; error bars are the confidence intervals over seeds.
    """
    plt = _pyplot()
    datasets = list(dict.fromkeys(g.dataset for g in groups))
    colors = _colors(list(dict.fromkeys(g.method for g in groups)))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        ax_r1, ax_rsum = axes[row]
        for group in (g for g in groups if g.dataset == dataset):
            params = group.stats.get("trainable_params")
            if params is None:
                continue
            color = colors[group.method]
            for metric, marker, face in (("test/i2t_R@1", "o", color), ("test/t2i_R@1", "s", "none")):
                stat = group.stats.get(metric)
                if stat is not None:
                    ax_r1.errorbar(
                        params.mean,
                        stat.mean,
                        yerr=stat.ci or 0,
                        fmt=marker,
                        color=color,
                        markerfacecolor=face,
                        markersize=8,
                        capsize=3,
                    )
            stat = group.stats.get("test/rsum")
            if stat is not None:
                ax_rsum.errorbar(
                    params.mean,
                    stat.mean,
                    yerr=stat.ci or 0,
                    fmt="o",
                    color=color,
                    markersize=8,
                    capsize=3,
                    label=group.method,
                )
                ax_rsum.annotate(
                    group.method,
                    (params.mean, stat.mean),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize=8,
                )
        for ax, label in ((ax_r1, "R@1 (%): ● image→text, □ text→image"), (ax_rsum, "RSUM")):
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(label)
            ax.set_title(f"{dataset}: {label.split(' (')[0].split(':')[0]} vs trainable parameters")
            ax.grid(True, which="both", alpha=0.3)
        ax_rsum.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float]]:
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per dataset (rows): training loss (mean over seeds, running mean) and validation RSUM by step."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    colors = _colors(methods)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        ax_loss, ax_val = axes[row]
        for method in methods:
            runs = [r for r in results if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            losses = [(r.get("curves") or {}).get("train_loss") or [] for r in runs]
            steps, values = _mean_curve(losses)
            if steps:
                window = max(1, len(steps) // 20)
                ax_loss.plot(steps, _smooth(values, window), color=colors[method], label=method)
            vals = [
                [
                    (p["step"], p["val/rsum"])
                    for p in (r.get("curves") or {}).get("val") or []
                    if "val/rsum" in p
                ]
                for r in runs
            ]
            steps, values = _mean_curve(vals)
            if steps:
                ax_val.plot(steps, values, marker="o", color=colors[method], label=method)
        ax_loss.set_title(f"{dataset}: training loss (mean over seeds)")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_val.set_title(f"{dataset}: validation RSUM")
        ax_val.set_xlabel("step")
        ax_val.set_ylabel("RSUM")
        for ax in (ax_loss, ax_val):
            ax.grid(True, alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
