"""Aggregate sweep results: mean and 95% confidence interval over seeds per dataset and method.

:func:`load_results` reads a sweep's result files, :func:`aggregate` groups them by (dataset, method) and
summarises every quantity with :func:`~pefttune.benchmark.stats.mean_ci` (Student t over the seeds; one
seed gives a mean without an interval), :func:`to_csv` and :func:`to_markdown` format the groups and
:func:`write_reports` writes ``results.csv``, ``results.md`` and the plots into the sweep's folder.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefttune.benchmark.stats import Summary, mean_ci

# Retrieval metrics shown in the Markdown table, in order; every other numeric test metric (zero-shot
# accuracies, mean ranks, ...) goes to the CSV, and zero-shot accuracies also to the table.
TABLE_METRICS = ("test/i2t_R@1", "test/i2t_R@5", "test/t2i_R@1", "test/t2i_R@5", "test/rsum")
COST_QUANTITIES = ("train_samples_per_s", "eval_images_per_s", "peak_memory_mb", "wall_time_s")
PARAM_KEYS = ("trainable_params", "total_params", "method_params", "head_params", "backbone_params")


def _get(result: dict[str, Any], *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _peak_memory(result: dict[str, Any]) -> float | None:
    memory = result.get("memory") or {}
    if memory.get("peak_allocated_mb") is not None:
        return memory["peak_allocated_mb"]
    return memory.get("peak_rss_mb")


QUANTITIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "trainable_params": lambda r: _get(r, "parameters", "trainable_params"),
    "total_params": lambda r: _get(r, "parameters", "total_params"),
    "method_params": lambda r: _get(r, "parameters", "trainable_by_group", "method"),
    "head_params": lambda r: _get(r, "parameters", "trainable_by_group", "head"),
    "backbone_params": lambda r: _get(r, "parameters", "trainable_by_group", "backbone"),
    "train_samples_per_s": lambda r: _get(r, "throughput", "train_samples_per_s"),
    "eval_images_per_s": lambda r: _get(r, "throughput", "eval_images_per_s"),
    "peak_memory_mb": _peak_memory,
    "wall_time_s": lambda r: r.get("wall_time_s"),
}


def load_results(output: str | Path) -> list[dict[str, Any]]:
    """Every finished run's result in ``<output>/results/*.json``, sorted by run id."""
    folder = Path(output) / "results"
    results = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("status") == "ok":
            results.append(result)
    return sorted(results, key=lambda r: (r["dataset"], r["method"], r["seed"]))


@dataclass
class Group:
    """The runs of one method on one dataset, summarised over seeds.

    Attributes:
        dataset: Dataset name.
        method: Method name.
        seeds: The seeds of the runs.
        stats: Quantity or metric name -> its summary over the seeds.
        results: The runs' results.
    """

    dataset: str
    method: str
    seeds: list[int]
    stats: dict[str, Summary] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.seeds)


def aggregate(results: Iterable[dict[str, Any]], level: float = 0.95) -> list[Group]:
    """Group results by (dataset, method) and summarise every metric and quantity over the seeds.

    Groups are ordered by dataset, then by trainable parameters (fewest first).
    """
    groups: dict[tuple[str, str], Group] = {}
    for result in results:
        key = (result["dataset"], result["method"])
        group = groups.setdefault(key, Group(result["dataset"], result["method"], []))
        group.seeds.append(int(result["seed"]))
        group.results.append(result)
    for group in groups.values():
        values: dict[str, list[float]] = {}
        for result in group.results:
            for name, value in (result.get("metrics") or {}).items():
                if isinstance(value, (int, float)):
                    values.setdefault(name, []).append(float(value))
            for name, getter in QUANTITIES.items():
                value = getter(result)
                if isinstance(value, (int, float)):
                    values.setdefault(name, []).append(float(value))
        group.stats = {name: mean_ci(vals, level) for name, vals in values.items()}

    def order(group: Group) -> tuple[str, float, str]:
        trainable = group.stats.get("trainable_params")
        return (group.dataset, trainable.mean if trainable else float("inf"), group.method)

    return sorted(groups.values(), key=order)


def _metric_columns(groups: Sequence[Group]) -> list[str]:
    names = {name for group in groups for name in group.stats if name not in QUANTITIES}
    first = [m for m in TABLE_METRICS if m in names]
    return first + sorted(names - set(first))


def to_csv(groups: Sequence[Group]) -> str:
    """One row per (dataset, method): seeds, then ``<name>_mean`` and ``<name>_ci95`` for everything."""
    columns = list(QUANTITIES) + _metric_columns(groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["dataset", "method", "n_seeds", "seeds"]
    for name in columns:
        header += [f"{name}_mean", f"{name}_ci95"]
    writer.writerow(header)
    for group in groups:
        row: list[Any] = [group.dataset, group.method, group.n, " ".join(map(str, group.seeds))]
        for name in columns:
            summary = group.stats.get(name)
            row += (
                ["", ""]
                if summary is None
                else [repr(summary.mean), "" if summary.ci is None else repr(summary.ci)]
            )
        writer.writerow(row)
    return buffer.getvalue()


def format_summary(summary: Summary | None, digits: int = 1) -> str:
    """``mean ± ci`` (``mean`` alone for one seed, ``n/a`` when missing)."""
    if summary is None:
        return "n/a"
    if summary.ci is None:
        return f"{summary.mean:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {summary.ci:.{digits}f}"


def format_count(count: float | None) -> str:
    """A parameter count in K/M."""
    if count is None:
        return "n/a"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}K"
    return f"{count:.0f}"


def _label(metric: str) -> str:
    name = metric.split("/", 1)[-1]
    return {"rsum": "RSUM"}.get(name, name.replace("_", " "))


def to_markdown(groups: Sequence[Group], level: float = 0.95) -> str:
    """One table per dataset: parameters, retrieval (and zero-shot) metrics, cost; mean ± CI over seeds."""
    lines: list[str] = []
    datasets = list(dict.fromkeys(group.dataset for group in groups))
    for dataset in datasets:
        rows = [group for group in groups if group.dataset == dataset]
        present = {name for group in rows for name in group.stats}
        metrics = [m for m in TABLE_METRICS if m in present]
        metrics += sorted(m for m in present if m.startswith("test/acc"))
        header = ["method", "trainable (%)", *map(_label, metrics), "train samples/s", "eval images/s"]
        header += ["peak memory (MB)", "wall (s)", "seeds"]
        lines += [f"### {dataset}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in rows:
            trainable = group.stats.get("trainable_params")
            total = group.stats.get("total_params")
            share = (
                f" ({100 * trainable.mean / total.mean:.2f}%)" if trainable and total and total.mean else ""
            )
            cells = [group.method, format_count(trainable.mean if trainable else None) + share]
            cells += [format_summary(group.stats.get(m)) for m in metrics]
            cells += [
                format_summary(group.stats.get(q), 0 if q != "train_samples_per_s" else 1)
                for q in COST_QUANTITIES
            ]
            cells.append(str(group.n))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    ci = f"{100 * level:g}%"
    lines.append(
        f"Mean ± half-width of the {ci} Student-t confidence interval over seeds (mean alone for one seed). "
        "Retrieval metrics on the test split in percent; RSUM = sum of the six R@K. Peak memory: process "
        "RSS on CPU, peak allocated on GPU."
    )
    return "\n".join(lines) + "\n"


def write_reports(output: str | Path, title: str | None = None, level: float = 0.95) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and the plots of the results in ``output``.

    Returns:
        The files written (none when there is no result yet).
    """
    output = Path(output)
    results = load_results(output)
    if not results:
        return []
    groups = aggregate(results, level)
    csv_path, md_path = output / "results.csv", output / "results.md"
    csv_path.write_text(to_csv(groups), encoding="utf-8")
    heading = f"## {title}\n\n" if title else ""
    md_path.write_text(heading + to_markdown(groups, level), encoding="utf-8")
    from pefttune.benchmark.plots import plot_retrieval_vs_params, plot_training_curves

    written = [csv_path, md_path]
    written.append(plot_retrieval_vs_params(groups, output / "retrieval_vs_params.png"))
    written.append(plot_training_curves(results, output / "training_curves.png"))
    return written
