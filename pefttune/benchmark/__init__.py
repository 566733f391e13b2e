"""Benchmark sweeps, result tables and plots.

* :mod:`pefttune.benchmark.suite`: suite files (datasets x methods x seeds, each run a config plus a diff).
* :mod:`pefttune.benchmark.sweep`: ``pefttune sweep``, one process per run, resumable.
* :mod:`pefttune.benchmark.recorder`: the callback that measures a run (throughput, memory, metrics).
* :mod:`pefttune.benchmark.aggregate`: mean and 95% CI over seeds, CSV and Markdown tables.
* :mod:`pefttune.benchmark.plots`: retrieval against trainable parameters, training curves.
"""

from pefttune.benchmark.aggregate import Group, aggregate, load_results, to_csv, to_markdown, write_reports
from pefttune.benchmark.recorder import BenchmarkRecorder, peak_rss_bytes
from pefttune.benchmark.stats import Summary, mean_ci, student_t_quantile
from pefttune.benchmark.suite import RunSpec, Suite, SuiteError
from pefttune.benchmark.sweep import execute_run, run_sweep, sweep_main

__all__ = [
    "BenchmarkRecorder",
    "Group",
    "RunSpec",
    "Suite",
    "SuiteError",
    "Summary",
    "aggregate",
    "execute_run",
    "load_results",
    "mean_ci",
    "peak_rss_bytes",
    "run_sweep",
    "student_t_quantile",
    "sweep_main",
    "to_csv",
    "to_markdown",
    "write_reports",
]
