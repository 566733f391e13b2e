"""Print the README's method tables from the registry (:mod:`pefttune.strategies.registry`).

* ``strategies``: every registered method with its paper, offline config and paper configs;
* ``parameters``: every method's trainable parameters on CLIP ViT-B/16. Each row (a registry entry's
  ``table_rows``) is built with the paper defaults on both towers of ``openai/clip-vit-base-patch16``,
  architecture-only (no download), exactly as ``pefttune inspect --no-weights`` builds models.

::

    python docs/gen_method_table.py                     # both tables
    python docs/gen_method_table.py --table strategies  # the first only (no model is built)
"""

from __future__ import annotations

import argparse

from pefttune.module import DualEncoderModule
from pefttune.strategies.registry import MethodSpec, methods
from pefttune.towers import CLIPImageTower, CLIPTextTower, architecture_only

CHECKPOINT = "openai/clip-vit-base-patch16"


def strategies_table(entries: list[MethodSpec]) -> list[str]:
    """The strategy / paper / config table."""
    lines = ["| strategy | paper | config (offline default) | paper setting |", "|---|---|---|---|"]
    for spec in entries:
        paper_configs = ", ".join(f"`{path}`" for path in spec.paper_configs)
        lines.append(f"| `{spec.strategy.__name__}` | {spec.paper} | `{spec.config}` | {paper_configs} |")
    return lines


def parameters_table(entries: list[MethodSpec]) -> list[str]:
    """The trainable-parameter table on CLIP ViT-B/16 (builds every row's model)."""
    lines = [
        "| method | trainable | % of total | method | backbone | head | temperature |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    # The towers and logit scale without what each method adds: the same for every row.
    totals: set[int] = set()
    for spec in entries:
        for label, arguments in spec.table_rows:
            with architecture_only():
                model = DualEncoderModule(
                    CLIPImageTower(CHECKPOINT), CLIPTextTower(CHECKPOINT), spec.build(**arguments)
                )
            report = model.parameter_report()
            groups = report["trainable_by_group"]
            named = model.named_parameters()
            totals.add(sum(p.numel() for n, p in named if model.strategy.group_of(n) != "method"))
            cells = [
                f"[{label}]({spec.docs})",
                f"{report['trainable_params']:,}",
                f"{100 * report['trainable_fraction']:.2f}%",
                *(f"{groups[group]:,}" for group in ("method", "backbone", "head", "temperature")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if len(totals) != 1:
        raise RuntimeError(f"the rows were built on different towers: totals {sorted(totals)}")
    lines.append(f"\nTotal parameters of the CLIP ViT-B/16 towers and logit scale: {totals.pop():,}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Print the chosen Markdown table(s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=("all", "strategies", "parameters"), default="all")
    args = parser.parse_args(argv)
    entries = methods()
    if args.table in ("all", "strategies"):
        print("\n".join(strategies_table(entries)))
    if args.table == "all":
        print()
    if args.table in ("all", "parameters"):
        print("\n".join(parameters_table(entries)))


if __name__ == "__main__":
    main()
