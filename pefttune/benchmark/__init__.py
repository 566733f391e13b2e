"""Benchmark sweeps, result tables and plots.

* :mod:`pefttune.benchmark.suite`: suite files (datasets x methods x seeds, each run a config plus a diff).
* :mod:`pefttune.benchmark.sweep`: ``pefttune sweep``, one process per run, resumable.
* :mod:`pefttune.benchmark.recorder`: the callback that measures a run (throughput, memory, metrics).
* :mod:`pefttune.benchmark.aggregate`: mean and 95% CI over seeds, each method against the best (paired),
  CSV and Markdown tables.
* :mod:`pefttune.benchmark.stats`: Student-t intervals, paired differences over seeds, paired bootstrap
  over test queries.
* :mod:`pefttune.benchmark.forgetting`: a second data set evaluated before and after adaptation.
* :mod:`pefttune.benchmark.plots`: retrieval against trainable parameters, training curves.
"""

from pefttune.benchmark.aggregate import (
    Comparison,
    Group,
    aggregate,
    compare_to_best,
    load_results,
    to_csv,
    to_markdown,
    write_reports,
)
from pefttune.benchmark.forgetting import ForgettingEvaluation
from pefttune.benchmark.recorder import BenchmarkRecorder, peak_rss_bytes
from pefttune.benchmark.stats import (
    Difference,
    Summary,
    mean_ci,
    paired_bootstrap_rsum,
    paired_seed_difference,
    student_t_quantile,
)
from pefttune.benchmark.suite import RunSpec, Suite, SuiteError
from pefttune.benchmark.sweep import execute_run, run_sweep, sweep_main

__all__ = [
    "BenchmarkRecorder",
    "Comparison",
    "Difference",
    "ForgettingEvaluation",
    "Group",
    "RunSpec",
    "Suite",
    "SuiteError",
    "Summary",
    "aggregate",
    "compare_to_best",
    "execute_run",
    "load_results",
    "mean_ci",
    "paired_bootstrap_rsum",
    "paired_seed_difference",
    "peak_rss_bytes",
    "run_sweep",
    "student_t_quantile",
    "sweep_main",
    "to_csv",
    "to_markdown",
    "write_reports",
]
