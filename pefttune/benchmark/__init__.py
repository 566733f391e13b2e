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

from __future__ import annotations

from typing import TYPE_CHECKING

from pefttune._lazy import lazy_attributes

# Eager: the function shares its name with its submodule, and importing the submodule later would make
# ``pefttune.benchmark.aggregate`` the module (an attribute that exists never reaches ``__getattr__``).
from pefttune.benchmark.aggregate import aggregate

# name -> the module that defines it; imported on first use (PEP 562).
_LAZY = {
    "BenchmarkRecorder": "pefttune.benchmark.recorder",
    "Comparison": "pefttune.benchmark.aggregate",
    "Difference": "pefttune.benchmark.stats",
    "ForgettingEvaluation": "pefttune.benchmark.forgetting",
    "Group": "pefttune.benchmark.aggregate",
    "RunSpec": "pefttune.benchmark.suite",
    "Suite": "pefttune.benchmark.suite",
    "SuiteError": "pefttune.benchmark.suite",
    "Summary": "pefttune.benchmark.stats",
    "compare_to_best": "pefttune.benchmark.aggregate",
    "execute_run": "pefttune.benchmark.sweep",
    "load_results": "pefttune.benchmark.aggregate",
    "mean_ci": "pefttune.benchmark.stats",
    "paired_bootstrap_rsum": "pefttune.benchmark.stats",
    "paired_seed_difference": "pefttune.benchmark.stats",
    "peak_rss_bytes": "pefttune.benchmark.recorder",
    "run_sweep": "pefttune.benchmark.sweep",
    "student_t_quantile": "pefttune.benchmark.stats",
    "sweep_main": "pefttune.benchmark.sweep",
    "to_csv": "pefttune.benchmark.aggregate",
    "to_markdown": "pefttune.benchmark.aggregate",
    "write_reports": "pefttune.benchmark.aggregate",
}

if TYPE_CHECKING:
    from pefttune.benchmark.aggregate import (
        Comparison,
        Group,
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

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

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
