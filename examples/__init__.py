"""Worked examples: a custom adaptation strategy written outside the package (see docs/custom_strategy.md)."""
