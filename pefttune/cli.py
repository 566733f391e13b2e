"""The ``pefttune`` command: ``fit|validate|test|predict`` (LightningCLI), ``inspect`` and ``sweep``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from pefttune.callbacks import AdapterCheckpoint, EmbeddingWriter, ExactResume
from pefttune.checkpointing import load_adapter
from pefttune.data.datamodule import ImageTextDataModule
from pefttune.module import DualEncoderModule
from pefttune.towers.base import architecture_only

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class PefttuneCLI(LightningCLI):
    """LightningCLI with pefttune's defaults.

    * Callbacks: the best (by ``val/rsum``) and last checkpoints, adapter-only ``adapter-last.pt`` and
      ``adapter-best.pt`` next to them (:class:`~pefttune.callbacks.AdapterCheckpoint`), exact resume
      (:class:`~pefttune.callbacks.ExactResume`) and a learning-rate monitor when logging.
    * ``validate|test|predict --adapter_path FILE``: load an adapter-only checkpoint into the model built
      from the config before running.
    * ``fit`` ends with a test of the best checkpoint (``--test_after_fit false`` to skip), so one command
      trains and prints test retrieval.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Default checkpointing (``--checkpoint.*``) and ``--test_after_fit``."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/rsum",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="after fit, test the best checkpoint"
        )
        parser.add_argument(
            "--adapter_path",
            type=str | None,
            default=None,
            help="validate/test/predict: an adapter-only checkpoint to load into the model of the config",
        )

    def _add_default_callbacks(self) -> None:
        callbacks = self.trainer.callbacks
        if not any(isinstance(c, ExactResume) for c in callbacks):
            callbacks.append(ExactResume())
        if self.trainer.checkpoint_callback is not None and not any(
            isinstance(c, AdapterCheckpoint) for c in callbacks
        ):
            callbacks.append(AdapterCheckpoint())

    def _load_adapter(self) -> None:
        path = self.config[self.subcommand].get("adapter_path")
        if path:
            load_adapter(self.model, path)

    def before_validate(self) -> None:
        """Load ``--adapter_path`` when given."""
        self._load_adapter()

    def before_test(self) -> None:
        """Load ``--adapter_path`` when given."""
        self._load_adapter()

    def before_fit(self) -> None:
        """Exact resume and adapter checkpoints; log learning rates per step when there is a logger."""
        self._add_default_callbacks()
        has_monitor = any(isinstance(c, LearningRateMonitor) for c in self.trainer.callbacks)
        if self.trainer.logger is not None and not has_monitor:
            self.trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))

    def before_predict(self) -> None:
        """Load ``--adapter_path``; write predictions to a file (``embeddings.pt`` in the log directory)."""
        self._load_adapter()
        if not any(isinstance(c, EmbeddingWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(EmbeddingWriter())

    def after_fit(self) -> None:
        """Test the best checkpoint (or the final weights when none was saved)."""
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.interrupted:
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> PefttuneCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) and return the CLI."""
    return PefttuneCLI(
        DualEncoderModule,
        ImageTextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``pefttune`` console script (also callable from Python and tests)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "inspect":
        inspect_main(argv[1:])
    elif argv and argv[0] == "sweep":
        from pefttune.benchmark.sweep import sweep_main

        sweep_main(argv[1:])
    else:
        cli_main(None if args is None else argv)


def build_model_from_config(config_path: str, overrides: Sequence[str] = ()) -> DualEncoderModule:
    """Instantiate only the ``model`` section of a fit config (no trainer, no data)."""
    from jsonargparse import ArgumentParser

    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if "model" not in config:
        raise KeyError(f"{config_path}: no 'model' section (expected model: {{class_path, init_args}})")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DualEncoderModule, "model", required=True)
    parsed = parser.parse_args(["--model", json.dumps(config["model"]), *overrides])
    return parser.instantiate_classes(parsed).model


def inspect_main(argv: Sequence[str]) -> dict[str, Any]:
    """``pefttune inspect --config FILE [--no-weights] [--json]``: build the model and count parameters."""
    parser = argparse.ArgumentParser(prog="pefttune inspect", description=inspect_main.__doc__)
    parser.add_argument("--config", "-c", required=True, help="a fit config (YAML)")
    parser.add_argument("--no-weights", action="store_true", help="build every tower from its architecture")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options, overrides = parser.parse_known_args(argv)
    if options.no_weights:
        with architecture_only():
            model = build_model_from_config(options.config, overrides)
    else:
        model = build_model_from_config(options.config, overrides)
    report = model.parameter_report()
    report["config"] = options.config
    report["weights"] = not options.no_weights
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """A human-readable parameter table."""
    lines = [
        f"config:      {report['config']}",
        f"strategy:    {report['strategy']}",
        f"total:       {report['total_params']:>14,}",
        f"trainable:   {report['trainable_params']:>14,}  ({100 * report['trainable_fraction']:.3f}%)",
        "by group:",
    ]
    lines += [f"  {group:<12}{count:>14,}" for group, count in report["trainable_by_group"].items()]
    lines.append("by tower (trainable / total):")
    for tower, count in report["trainable_by_tower"].items():
        total = report["total_by_tower"].get(tower)
        lines.append(f"  {tower:<12}{count:>14,}" + (f" / {total:,}" if total is not None else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
