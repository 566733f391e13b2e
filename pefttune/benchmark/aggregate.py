"""Aggregate sweep results: mean and 95% confidence interval over seeds, and each method against the best.

:func:`load_results` reads a sweep's result files (and notes each run's saved per-query ranks),
:func:`aggregate` groups them by (dataset, method), summarises every quantity with
:func:`~pefttune.benchmark.stats.mean_ci` (Student t over the seeds; one seed gives a mean without an
interval) and compares every method with the dataset's best one (:func:`compare_to_best`: paired
differences over seeds and a paired bootstrap over test queries), :func:`to_csv` and :func:`to_markdown`
format the groups and :func:`write_reports` writes ``results.csv``, ``results.md`` and the plots into the
sweep's folder. ``docs/benchmarks.md`` ("How methods are compared") describes the procedure.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefttune.benchmark.stats import (
    DEFAULT_RESAMPLES,
    Difference,
    Summary,
    mean_ci,
    paired_bootstrap_rsum,
    paired_seed_difference,
)

#: Suffix of a run's per-query ranks file next to its result JSON (``<slug>.ranks.npz``).
RANKS_SUFFIX = ".ranks.npz"
#: The recorder's own copy in the run folder (``runs/<run id>/recorder.ranks.npz``).
RECORDER_RANKS = "recorder.ranks.npz"

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
    """Every finished run's result in ``<output>/results/*.json``, sorted by run id.

    A run's per-query test ranks, when it saved them (``<slug>.ranks.npz`` next to the JSON, else the
    recorder's copy in ``runs/<run id>/``), are noted under the key ``"_query_ranks"`` (a path).
    """
    output = Path(output)
    folder = output / "results"
    results = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("status") == "ok":
            candidates = [path.with_name(path.name.removesuffix(".json") + RANKS_SUFFIX)]
            if result.get("run_id"):
                candidates.append(output / "runs" / str(result["run_id"]) / RECORDER_RANKS)
            ranks = next((c for c in candidates if c.is_file()), None)
            if ranks is not None:
                result["_query_ranks"] = str(ranks)
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
        comparison: This method against the dataset's best (:func:`compare_to_best`).
    """

    dataset: str
    method: str
    seeds: list[int]
    stats: dict[str, Summary] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    comparison: Comparison | None = None

    def per_seed(self, metric: str) -> dict[int, float]:
        """``seed -> value`` of a metric over this group's runs (runs without it left out)."""
        values = {}
        for result in self.results:
            value = (result.get("metrics") or {}).get(metric)
            if isinstance(value, (int, float)):
                values[int(result["seed"])] = float(value)
        return values

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.seeds)

    @property
    def collapsed_seeds(self) -> int:
        """How many of the runs' test embeddings were flagged as collapsed."""
        return sum(1 for v in self.per_seed("test/collapsed").values() if v >= 0.5)


@dataclass
class Comparison:
    """A method against the best method of its dataset on the primary metric (``method - best``).

    Attributes:
        metric: The compared metric (``test/rsum`` for retrieval, else a zero-shot accuracy).
        best: The best method (highest mean over seeds).
        seeds: Mean paired difference over the shared seeds with its Student-t interval (None when the two
            share no seed).
        queries: RSUM difference with the paired-bootstrap interval over test images (None without saved
            per-query ranks for every shared seed, or for a non-retrieval metric).
        is_best: This is the best method itself.
    """

    metric: str
    best: str
    seeds: Difference | None = None
    queries: Difference | None = None
    is_best: bool = False

    @property
    def separable(self) -> bool | None:
        """Whether the method is separable from the best: every available interval excludes 0.

        None when no interval is available (one seed and no saved ranks), or for the best itself.
        """
        if self.is_best:
            return None
        verdicts = [d.excludes_zero for d in (self.seeds, self.queries) if d is not None and d.has_interval]
        if not verdicts:
            return None
        return all(verdicts)


def aggregate(
    results: Iterable[dict[str, Any]],
    level: float = 0.95,
    compare: bool = True,
    resamples: int = DEFAULT_RESAMPLES,
) -> list[Group]:
    """Group results by (dataset, method) and summarise every metric and quantity over the seeds.

    Groups are ordered by dataset, then by trainable parameters (fewest first). With ``compare`` every
    group also gets its :class:`Comparison` with the dataset's best method (:func:`compare_to_best`).
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

    ordered = sorted(groups.values(), key=order)
    if compare:
        compare_to_best(ordered, level, resamples)
    return ordered


def primary_metric(groups: Sequence[Group]) -> str | None:
    """The metric methods are ranked by.

    ``test/rsum``, else ``test/acc_hm`` (base-to-new), ``test/acc``, or the first zero-shot accuracy.
    """
    names = {name for group in groups for name in group.stats}
    for preferred in ("test/rsum", "test/acc_hm", "test/acc"):
        if preferred in names:
            return preferred
    accuracies = sorted(name for name in names if name.startswith("test/acc"))
    return accuracies[0] if accuracies else None


def _ks(result: dict[str, Any]) -> tuple[int, ...]:
    ks = []
    for name in result.get("metrics") or {}:
        if name.startswith("test/i2t_R@"):
            ks.append(int(name.removeprefix("test/i2t_R@")))
    return tuple(sorted(ks))


def compare_to_best(groups: Sequence[Group], level: float = 0.95, resamples: int = DEFAULT_RESAMPLES) -> None:
    """Set every group's :attr:`Group.comparison` with the best method of its dataset.

    Per dataset, the best method has the highest mean of :func:`primary_metric`. Every other method gets
    (1) the mean over the seeds both ran of the paired difference, with a Student-t interval, and (2) for
    RSUM, when both saved per-query test ranks for each of those seeds, the difference with a paired
    bootstrap interval over test images (:func:`~pefttune.benchmark.stats.paired_bootstrap_rsum`).
    """
    from pefttune.metrics import RankedQueries

    loaded: dict[str, RankedQueries] = {}

    def queries(result: dict[str, Any]) -> RankedQueries | None:
        path = result.get("_query_ranks")
        if not path:
            return None
        if path not in loaded:
            loaded[path] = RankedQueries.load(path)
        return loaded[path]

    for dataset in dict.fromkeys(group.dataset for group in groups):
        rows = [group for group in groups if group.dataset == dataset]
        metric = primary_metric(rows)
        if metric is None:
            continue
        ranked = [group for group in rows if metric in group.stats]
        if not ranked:
            continue
        best = max(ranked, key=lambda group: group.stats[metric].mean)
        best_values = best.per_seed(metric)
        best_runs = {int(r["seed"]): r for r in best.results}
        for group in ranked:
            if group is best:
                group.comparison = Comparison(metric, best.method, is_best=True)
                continue
            comparison = Comparison(
                metric, best.method, seeds=paired_seed_difference(group.per_seed(metric), best_values, level)
            )
            if metric == "test/rsum":
                runs = {int(r["seed"]): r for r in group.results}
                shared = sorted(set(runs) & set(best_runs))
                pairs = [(queries(runs[s]), queries(best_runs[s])) for s in shared]
                complete = [(a, b) for a, b in pairs if a is not None and b is not None]
                if shared and len(complete) == len(shared):
                    comparison.queries = paired_bootstrap_rsum(
                        complete,  # type: ignore[arg-type]
                        ks=_ks(runs[shared[0]]) or (1, 5, 10),
                        level=level,
                        resamples=resamples,
                        where=f"{dataset}: {group.method} against {best.method}",
                    )
            group.comparison = comparison


def _metric_columns(groups: Sequence[Group]) -> list[str]:
    names = {name for group in groups for name in group.stats if name not in QUANTITIES}
    first = [m for m in TABLE_METRICS if m in names]
    return first + sorted(names - set(first))


COMPARISON_COLUMNS = (
    "vs_best_metric",
    "vs_best_method",
    "vs_best_diff",
    "vs_best_seeds_ci95_low",
    "vs_best_seeds_ci95_high",
    "vs_best_queries_diff",
    "vs_best_queries_ci95_low",
    "vs_best_queries_ci95_high",
    "separable_from_best",
    "collapsed_seeds",
)


def _comparison_cells(group: Group) -> list[Any]:
    comparison = group.comparison
    if comparison is None:
        return ["", "", "", "", "", "", "", "", "", group.collapsed_seeds]
    seeds, queries = comparison.seeds, comparison.queries

    def number(value: float | None) -> str:
        return "" if value is None else repr(value)

    if comparison.is_best:
        verdict = "best"
    else:
        verdict = {True: "yes", False: "no", None: "unknown"}[comparison.separable]
    return [
        comparison.metric,
        comparison.best,
        "0.0" if comparison.is_best else number(seeds.estimate if seeds else None),
        number(seeds.low if seeds else None),
        number(seeds.high if seeds else None),
        number(queries.estimate if queries else None),
        number(queries.low if queries else None),
        number(queries.high if queries else None),
        verdict,
        group.collapsed_seeds,
    ]


def to_csv(groups: Sequence[Group]) -> str:
    """One row per (dataset, method): means and intervals, then the comparison with the best method.

    Columns: seeds, ``<name>_mean`` and ``<name>_ci95`` for every quantity and metric, then
    :data:`COMPARISON_COLUMNS`.
    """
    columns = list(QUANTITIES) + _metric_columns(groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["dataset", "method", "n_seeds", "seeds"]
    for name in columns:
        header += [f"{name}_mean", f"{name}_ci95"]
    writer.writerow(header + list(COMPARISON_COLUMNS))
    for group in groups:
        row: list[Any] = [group.dataset, group.method, group.n, " ".join(map(str, group.seeds))]
        for name in columns:
            summary = group.stats.get(name)
            row += (
                ["", ""]
                if summary is None
                else [repr(summary.mean), "" if summary.ci is None else repr(summary.ci)]
            )
        writer.writerow(row + _comparison_cells(group))
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
    name = metric.rsplit("/", 1)[-1]
    return {"rsum": "RSUM"}.get(name, name.replace("_", " "))


def _interval(difference: Difference | None, digits: int) -> str | None:
    if difference is None or not difference.has_interval:
        return None
    return f"[{difference.low:+.{digits}f}, {difference.high:+.{digits}f}]"


def format_comparison(comparison: Comparison | None, digits: int = 1) -> str:
    """``best``, or the difference to the best with its intervals (seeds; test queries) and a verdict.

    A method not separable from the best (an interval contains 0) is marked ``≈ best``.
    """
    if comparison is None:
        return "n/a"
    if comparison.is_best:
        return "**best**"
    seeds, queries = comparison.seeds, comparison.queries
    estimate = seeds.estimate if seeds is not None else (queries.estimate if queries is not None else None)
    if estimate is None:
        return "n/a"
    parts = [f"{estimate:+.{digits}f}"]
    seed_interval, query_interval = _interval(seeds, digits), _interval(queries, digits)
    if seed_interval or query_interval:
        parts.append(f"seeds {seed_interval or 'n/a'}; queries {query_interval or 'n/a'}")
    verdict = {True: "", False: " ≈ best", None: " (no interval)"}[comparison.separable]
    return " ".join(parts) + verdict


def _flags(group: Group) -> str:
    flags = []
    if group.collapsed_seeds:
        flags.append(f"collapsed {group.collapsed_seeds}/{group.n}")
    tied = [
        f"{direction} {group.stats[name].mean:.0f}"
        for direction, name in (("i2t", "test/i2t_tied_queries"), ("t2i", "test/t2i_tied_queries"))
        if name in group.stats and group.stats[name].mean > 0
    ]
    if tied:
        flags.append("tied queries " + ", ".join(tied))
    return "; ".join(flags) or "-"


def forgetting_metric(groups: Sequence[Group]) -> str | None:
    """The forgetting column's metric: the change of RSUM on the second data set, else of its accuracy."""
    names = {name for group in groups for name in group.stats if name.startswith("forget/change/")}
    for preferred in ("forget/change/rsum", "forget/change/acc_hm", "forget/change/acc"):
        if preferred in names:
            return preferred
    accuracies = sorted(name for name in names if name.startswith("forget/change/acc"))
    return accuracies[0] if accuracies else None


def to_markdown(groups: Sequence[Group], level: float = 0.95) -> str:
    """One table per dataset: parameters, metrics, cost, difference to the best, forgetting and flags."""
    lines: list[str] = []
    datasets = list(dict.fromkeys(group.dataset for group in groups))
    for dataset in datasets:
        rows = [group for group in groups if group.dataset == dataset]
        present = {name for group in rows for name in group.stats}
        metrics = [m for m in TABLE_METRICS if m in present]
        metrics += sorted(m for m in present if m.startswith("test/acc"))
        compared = next((g.comparison.metric for g in rows if g.comparison is not None), None)
        header = ["method", "trainable (%)", *map(_label, metrics), "train samples/s", "eval images/s"]
        header += ["peak memory (MB)", "wall (s)", "seeds"]
        if compared is not None:
            header.append(f"Δ {_label(compared)} vs best")
        forgetting = forgetting_metric(rows)
        if forgetting is not None:
            header.append(f"forgetting: Δ {_label(forgetting)} on 2nd data set")
        header.append("flags")
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
            if compared is not None:
                cells.append(format_comparison(group.comparison))
            if forgetting is not None:
                change, before = (
                    group.stats.get(forgetting),
                    group.stats.get(forgetting.replace("change", "before")),
                )
                cell = format_summary(change)
                cells.append(cell if before is None else f"{cell} (from {before.mean:.1f})")
            cells.append(_flags(group))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    ci = f"{100 * level:g}%"
    lines.append(
        f"Mean ± half-width of the {ci} Student-t confidence interval over seeds (mean alone for one seed). "
        "Retrieval metrics on the test split in percent; RSUM = sum of the six R@K. Peak memory: process "
        "RSS on CPU, peak allocated on GPU."
    )
    lines.append("")
    lines.append(
        f"Δ vs best: the method minus the dataset's best method, mean of the paired differences over the "
        f"seeds both ran, with {ci} intervals: `seeds` a paired Student-t interval over seeds, `queries` a "
        "paired bootstrap over test images (each resample of images, with their captions, is shared by "
        "both methods). `≈ best`: an interval contains 0, the method is not separable from the best. "
        "Flags: `collapsed k/n` = the test embeddings collapsed in k of n seeds (the retrieval numbers "
        "then measure ties); `tied queries` = mean number of test queries whose best relevant candidate "
        "tied with another (docs/protocol.md). Forgetting (when the suite names a second data set): its "
        "test metric after adaptation minus before, with the value before in parentheses; negative = "
        "forgotten."
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
