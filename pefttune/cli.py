"""The ``pefttune`` command: one entry point for every subcommand.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands (:class:`PefttuneCLI`);
``inspect`` (parameter counts), ``sweep`` (benchmark suites) and ``visualize`` (retrieval pictures) are
pefttune's own and parse configs with the same parser (:func:`parse_config`), so a config composes the
same way everywhere (several ``--config`` files, dotted overrides, ``--print_config``). Options use one style,
``--snake_case``; the older ``--kebab-case`` spellings of ``inspect`` and ``sweep`` still work.

A config may be given by the name of a shipped config (``pefttune fit --config duet``,
``--config paper/lora_clip_vitb16``): they are installed with the package (:func:`resolve_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, Checkpoint, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from pefttune._entry import (
    DESCRIPTION,
    LIGHTNING_SUBCOMMANDS,
    PACKAGED_CONFIGS,
    SUBCOMMANDS,
    main,
    packaged_configs,
    resolve_config,
    resolve_config_arguments,
    usage_error,
)
from pefttune.callbacks import (
    CollapseDetector,
    EmbeddingWriter,
    ExactResume,
    ProgressLog,
    RunCheckpoint,
    ordered_metrics,
)
from pefttune.checkpointing import describe_unreadable, load_adapter
from pefttune.data.classification import ClassificationDataModule
from pefttune.data.datamodule import ImageTextDataModule
from pefttune.module import DualEncoderModule
from pefttune.towers.base import architecture_only

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- errors --------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and what was expected."""


_PARSER_KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^(\s*)- Problem with given class_path '([^']+)':")
_STRUCTURE = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value",
    "- Expected a <class 'NoneType'>",
)


def summarise_parse_error(message: str) -> str:
    """The one line of a nested jsonargparse error that matters: the full key and the innermost problem.

    ``Parser key "model": ... class_path 'DualEncoderModule': Parser key "strategy": ... Parser key "width":
    Expected a <class 'int'>. Got value: wide`` becomes ``model.init_args.strategy.init_args.width: Expected
    a <class 'int'>. Got value: wide``; an unknown strategy class also lists the valid strategies.
    """
    stack: list[tuple[int, str]] = []
    leaf: tuple[list[str], str] | None = None
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip())
        match = _PARSER_KEY.match(line) or _CLASS_PATH.match(line)
        if match:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            key = match.group(2) if _PARSER_KEY.match(line) else "init_args"
            stack.append((indent, key))
            continue
        text = line.strip()
        if not text or text.startswith(_STRUCTURE):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        keys = [key for _, key in stack]
        if leaf is None or len(keys) > len(leaf[0]):
            leaf = (keys, text.removeprefix("- "))
    if leaf is None:
        return message.strip().splitlines()[0] if message.strip() else message
    keys, text = leaf
    key = ".".join(k for i, k in enumerate(keys) if not (k == "init_args" and i + 1 == len(keys)))
    summary = f"{key}: {text}" if key else text
    if keys and keys[-1] in ("strategy", "init_args") and "strategy" in keys and _is_class_problem(text):
        summary += "\n  valid strategies: " + ", ".join(known_strategies())
    return summary


def _is_class_problem(text: str) -> bool:
    lowered = text.lower()
    return any(
        word in lowered
        for word in ("import", "not a subclass", "no module", "has no attribute", "class_path")
    )


def known_strategies() -> list[str]:
    """Class paths of the registered adaptation methods (:mod:`pefttune.strategies.registry`)."""
    from pefttune.strategies.registry import available_strategies

    return sorted(available_strategies().values())


class PefttuneArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with errors that end with the one line that matters.

    jsonargparse prints the whole usage (80 lines for ``fit``) before a nested error; here the details come
    first, then a one-line pointer to ``--help``, then ``error: KEY: PROBLEM`` as the last line.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the details, then the summary line, and exit with status 2."""
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{message.rstrip()}\n\n")
        sys.stderr.write(f"(every option: {prog} --help)\n")
        sys.stderr.write(f"error: {summarise_parse_error(message)}\n")
        self.exit(2)


# -- the LightningCLI ----------------------------------------------------------------------------------------
class PefttuneCLI(LightningCLI):
    """LightningCLI with pefttune's defaults, all visible in ``--print_config`` and the saved config.

    * ``checkpoint``: :class:`~pefttune.callbacks.RunCheckpoint`, the best (by ``val/rsum``) and last
      checkpoints with ``adapter-best.safetensors`` and ``adapter-last.safetensors`` beside them; off with
      ``--trainer.enable_checkpointing false``. Writes are atomic (``trainer.plugins``:
      :class:`~pefttune.checkpointing.AtomicCheckpointIO`).
    * ``exact_resume`` (:class:`~pefttune.callbacks.ExactResume`), ``collapse_detector``
      (:class:`~pefttune.callbacks.CollapseDetector`) and ``progress_log``
      (:class:`~pefttune.callbacks.ProgressLog`); a learning-rate monitor when logging.
    * ``--adapter_path FILE``: ``fit`` starts from the adapter-only checkpoint; ``validate|test|predict``
      evaluate it, loaded into the model built from the config.
    * ``fit --ckpt_path`` continues in the run's own log folder, so the best score so far is kept.
    * ``fit`` ends with a test of the best checkpoint (``--test_after_fit false`` to skip); metrics are
      printed rounded, R@1, R@5, R@10 first; where logs, config, checkpoints and adapter files went is
      printed when a run starts and ends.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", PefttuneArgumentParser)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", DESCRIPTION)
        parser_kwargs.setdefault("prog", "pefttune")
        for subcommand in LIGHTNING_SUBCOMMANDS:
            parser_kwargs.setdefault(subcommand, {}).setdefault("prog", f"pefttune {subcommand}")
        kwargs["parser_kwargs"] = parser_kwargs
        trainer_defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        trainer_defaults.setdefault("plugins", [{"class_path": "pefttune.checkpointing.AtomicCheckpointIO"}])
        kwargs["trainer_defaults"] = trainer_defaults
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The default callbacks (each a config section), ``--test_after_fit`` and ``--adapter_path``."""
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/rsum",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_lightning_class_args(ExactResume, "exact_resume")
        parser.add_lightning_class_args(CollapseDetector, "collapse_detector")
        parser.add_lightning_class_args(ProgressLog, "progress_log")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="after fit, test the best checkpoint"
        )
        parser.add_argument(
            "--adapter_path",
            type=str | None,
            default=None,
            help="an adapter-only checkpoint: fit starts from it; validate/test/predict evaluate it",
        )

    # -- parsing and checks --------------------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse an unreadable ``--ckpt_path`` before Lightning reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        self._configured_strategy = _strategy_class_path(self.config[subcommand])
        path = self.config[subcommand].get("ckpt_path")
        if path and os.path.isfile(path):
            problem = describe_unreadable(path)
            if problem is not None:
                usage_error(subcommand, f"--ckpt_path {problem}")

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from the checkpoint's recorded settings (Lightning); name what they replaced.

        (Overrides a private LightningCLI method, 2.x.) A setting given for the model, on the command line or
        in a config, that differs from the checkpoint's is replaced without a word by Lightning; this names
        each one, so an evaluation option (APEX's ``retrieval_ensemble``, ``tie_rule``) is not believed
        applied when it was not.
        """
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        given = dict(_leaves(model)) if model is not None else {}
        super()._parse_ckpt_path()
        if not given:
            return
        recorded = dict(_leaves(self.config[subcommand].get("model")))
        replaced = [
            f"{key}: {given[key]!r} -> {recorded[key]!r}"
            for key in given
            if key in recorded and given[key] != recorded[key]
        ]
        if replaced:
            rank_zero_warn(
                f"--ckpt_path: the model is rebuilt with the settings recorded in "
                f"{self.config[subcommand]['ckpt_path']}, which replace these given ones: "
                + "; ".join(f"model.{item}" for item in replaced[:10])
                + ("; ..." if len(replaced) > 10 else "")
                + ". To evaluate trained weights with other settings, pass the adapter file beside the "
                "checkpoint (adapter-best.safetensors) with --adapter_path instead of --ckpt_path."
            )

    def before_instantiate_classes(self) -> None:
        """Refuse options that would be silently ignored or replaced; continue a resumed run's folder."""
        subcommand = self.subcommand
        if subcommand is None:
            return
        config = self.config[subcommand]
        strategy = _strategy_class_path(config)
        configured = getattr(self, "_configured_strategy", None)
        if config.get("ckpt_path") and configured and strategy != configured:
            # LightningCLI builds the model from the checkpoint's recorded config when it has one.
            rank_zero_warn(
                f"the model is built from the config recorded in {config['ckpt_path']} "
                f"(strategy {strategy}), not from the given config (strategy {configured})"
            )
        for key, instead in (("optimizer", "optimizer"), ("lr_scheduler", "lr_schedule")):
            if config.get(key) is not None:
                usage_error(
                    subcommand,
                    f"--{key} is not supported: it would replace the strategy's parameter groups (per-group "
                    f"learning rates, no weight decay on norms) and schedule. Set "
                    f"model.init_args.{instead} instead, e.g. --model.init_args.{instead}.init_args.lr=1e-4"
                    if key == "optimizer"
                    else f"--{key} is not supported: it would replace the model's per-step schedule. Set "
                    f"model.init_args.{instead} instead (pefttune.optim.WarmupCosine or Constant)",
                )
        if subcommand == "fit" and config.get("adapter_path") and config.get("ckpt_path"):
            usage_error(
                subcommand,
                "give --adapter_path (start a new run from an adapter) or --ckpt_path (resume a run), "
                "not both",
            )
        if subcommand == "fit" and config.get("ckpt_path"):
            self._continue_run_folder(config)

    def _continue_run_folder(self, config: Namespace) -> None:
        # A resumed run logs into the folder of the run it continues: its checkpoint folder (under the log
        # folder by default) is then the same, and the ModelCheckpoint keeps its best score and files
        # (Lightning drops them when the folder changed, and a worse epoch became "best").
        version = _checkpoint_logger_version(config["ckpt_path"])
        trainer = config["trainer"]
        logger = trainer.get("logger")
        if version is None or logger is False:
            return
        if logger is None or logger is True:
            trainer["logger"] = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=trainer.get("default_root_dir") or os.getcwd(), version=version),
            )
        elif (
            isinstance(logger, Namespace)
            and isinstance(logger.get("init_args"), Namespace)
            and "version" in logger.init_args
            and logger.init_args.get("version") is None
        ):
            logger.init_args["version"] = version

    def instantiate_classes(self) -> None:
        """Instantiate; an error raised by a class names the config key of the argument it is about."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            if isinstance(error, ConfigError):
                raise
            key = _key_of_error(self.config.get(str(self.subcommand), self.config), str(error))
            raise ConfigError(f"{key}: {_innermost(error)}" if key else str(error)) from error

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer with the default callbacks; without checkpoint callbacks when checkpointing is off."""
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if trainer_config.get("enable_checkpointing") is False:
            extra = [callback for callback in extra if not isinstance(callback, Checkpoint)]
        return self._instantiate_trainer(trainer_config, extra)

    # -- subcommands ---------------------------------------------------------------------------------------
    def _load_adapter(self) -> None:
        path = self.config[self.subcommand].get("adapter_path")
        if path:
            load_adapter(self.model, path)
            print(f"pefttune: loaded adapter {path}", flush=True)

    def before_fit(self) -> None:
        """Start from ``--adapter_path``; log learning rates; say where the run's files go."""
        self._load_adapter()
        has_monitor = any(isinstance(c, LearningRateMonitor) for c in self.trainer.callbacks)
        if self.trainer.logger is not None and not has_monitor:
            self.trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        self.trainer.callbacks.append(_RunReport(self))

    def after_fit(self) -> None:
        """Test the best checkpoint (or the final weights when none was saved); say where things went."""
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.interrupted:
            callback = self.trainer.checkpoint_callback
            best = getattr(callback, "best_model_path", "") if callback is not None else ""
            results = self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False
            )
            print_metrics(results, f"test of {best}" if best else "test of the final weights")
        print_locations(run_locations(self.trainer, self.config[self.subcommand]), "went")

    def before_validate(self) -> None:
        """Load ``--adapter_path`` when given."""
        self._load_adapter()

    def before_test(self) -> None:
        """Load ``--adapter_path`` when given."""
        self._load_adapter()

    def validate(self, **kwargs: Any) -> Any:
        """``Trainer.validate``, its metrics printed rounded in reading order."""
        verbose = kwargs.pop("verbose", True)
        results = self.trainer.validate(verbose=False, **kwargs)
        if verbose:
            print_metrics(results, "validation")
        return results

    def test(self, **kwargs: Any) -> Any:
        """``Trainer.test``, its metrics printed rounded in reading order."""
        verbose = kwargs.pop("verbose", True)
        results = self.trainer.test(verbose=False, **kwargs)
        if verbose:
            print_metrics(results, "test")
        return results

    def before_predict(self) -> None:
        """Load ``--adapter_path``; write predictions to a file (``embeddings.pt`` in the log directory)."""
        self._load_adapter()
        if not any(isinstance(c, EmbeddingWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(EmbeddingWriter())

    def after_predict(self) -> None:
        """Say where the embeddings went."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, EmbeddingWriter) and callback.written:
                print(f"pefttune: embeddings  {callback.written}", flush=True)


class _RunReport(Callback):
    """Prints where the run's files go once the folders are known (after Lightning's setup)."""

    def __init__(self, cli: PefttuneCLI) -> None:
        self.cli = cli

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Print the locations."""
        if trainer.is_global_zero:
            print_locations(run_locations(trainer, self.cli.config[self.cli.subcommand]), "go")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Say which checkpoint to resume from (Ctrl+C and errors alike)."""
        if not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or ""
        what = (
            "interrupted"
            if isinstance(exception, KeyboardInterrupt)
            else f"stopped by {type(exception).__name__}"
        )
        print(f"pefttune: {what} at step {trainer.global_step}", flush=True)
        if last and os.path.isfile(last):
            print(f"pefttune: resume from the last checkpoint with --ckpt_path {last}", flush=True)
        else:
            print("pefttune: no checkpoint was written yet", flush=True)


def _strategy_class_path(config: Namespace) -> str | None:
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    strategy = init_args.get("strategy") if isinstance(init_args, Namespace) else None
    return strategy.get("class_path") if isinstance(strategy, Namespace) else None


def _checkpoint_logger_version(path: str) -> int | str | None:
    if not os.path.isfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable files are reported when Lightning reads them next
        return None
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("logger_version") is not None:
            return state["logger_version"]
    return None


def _innermost(error: BaseException) -> str:
    # jsonargparse wraps a class's own error in "Does not validate against any of the Union subtypes".
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[0]


def _key_of_error(config: Any, message: str) -> str | None:
    """The dotted config key an instantiation error is about, found by the argument name it mentions."""
    message = _innermost_text(message).lower()
    best: tuple[int, str] | None = None
    for key, value in _leaves(config):
        name = key.rsplit(".", 1)[-1]
        words = name.replace("_", " ")
        if name.lower() in message or words.lower() in message:
            score = 2 if str(value).lower() in message else 1
            if best is None or score > best[0]:
                best = (score, f"{key} = {value!r}")
    return best[1] if best else None


def _innermost_text(message: str) -> str:
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(_STRUCTURE[:4]) and "NoneType" not in line]
    return kept[0] if kept else message


def _leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    items = config.items() if isinstance(config, Namespace | dict) else []
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, Namespace | dict):
            yield from _leaves(value, dotted + ".")
        elif key not in ("class_path", "__path__"):
            yield dotted, value


# -- reporting -----------------------------------------------------------------------------------------------
def run_locations(trainer: Any, config: Any = None) -> dict[str, str]:
    """Where a run writes: logs, resolved config, checkpoints, adapter files."""
    places: dict[str, str] = {}
    log_dir = trainer.log_dir if trainer.loggers else None
    if log_dir:
        places["logs"] = f"{log_dir} (tensorboard --logdir {os.path.dirname(os.path.dirname(log_dir))})"
        places["config"] = os.path.join(log_dir, "config.yaml")
    else:
        places["logs"] = "none (trainer.logger is false)"
    callback = trainer.checkpoint_callback
    if isinstance(callback, RunCheckpoint) and callback.dirpath:
        best = os.path.basename(callback.best_model_path) or "-"
        last = os.path.basename(callback.last_model_path) or "-"
        places["checkpoints"] = f"{callback.dirpath} (best by {callback.monitor}: {best}, last: {last})"
        if callback.adapter_files:
            places["adapters"] = os.path.join(str(callback.dirpath), "adapter-{best,last}.safetensors")
    elif callback is not None and getattr(callback, "dirpath", None):
        places["checkpoints"] = str(callback.dirpath)
    else:
        places["checkpoints"] = "none (trainer.enable_checkpointing is false)"
    return places


def print_locations(places: dict[str, str], verb: str) -> None:
    """One line per kind of output: ``pefttune: checkpoints go to PATH``."""
    for kind, place in places.items():
        print(f"pefttune: {kind:<11} {verb} to {place}", flush=True)


def print_metrics(results: Sequence[dict[str, float]], title: str) -> None:
    """A metrics table: R@1, R@5, R@10 per direction first, then RSUM and the rest, two decimals."""
    for index, metrics in enumerate(results):
        if not metrics:
            continue
        suffix = f" (dataloader {index})" if len(results) > 1 else ""
        ordered = ordered_metrics({k: float(v) for k, v in metrics.items()})
        width = max(len(k) for k in ordered)
        print(f"{title}{suffix}:")
        for name, value in ordered.items():
            print(f"  {name:<{width}}  {value:10.2f}")
    sys.stdout.flush()


# -- quiet dependencies --------------------------------------------------------------------------------------
class _DropAdvertising(logging.Filter):
    """Drops Lightning's "Tip: install litlogger/litmodels" lines (printed on every run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and ("litlogger" in message or "litmodels" in message))


def quiet_dependencies() -> None:
    """Silence advertising and deprecation noise of dependencies that the user cannot act on."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertising) for f in logger.filters):
            logger.addFilter(_DropAdvertising())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropAdvertising) for f in handler.filters):
                handler.addFilter(_DropAdvertising())
    warnings.filterwarnings(
        "ignore", category=DeprecationWarning, module=r"(torch|lightning|timm|transformers)"
    )
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|transformers|torch)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")


__all__ = [
    "DESCRIPTION",
    "LIGHTNING_SUBCOMMANDS",
    "PACKAGED_CONFIGS",
    "SUBCOMMANDS",
    "ConfigError",
    "PefttuneCLI",
    "build_model_from_config",
    "cli_main",
    "inspect_main",
    "main",
    "packaged_configs",
    "parse_config",
    "resolve_config",
]


#: The data modules pefttune ships. jsonargparse lists the subclasses already imported in ``--help``, and
#: :mod:`pefttune.data` imports lazily, so they are imported here by name.
DATA_MODULES = (ImageTextDataModule, ClassificationDataModule)


# -- entry points --------------------------------------------------------------------------------------------
def cli_main(args: Sequence[str] | None = None, run: bool = True) -> PefttuneCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) and return the CLI."""
    quiet_dependencies()
    argv = None if args is None else resolve_config_arguments(list(args))
    return PefttuneCLI(
        DualEncoderModule,
        ImageTextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


# -- config parsing for inspect and visualize ----------------------------------------------------------------
class _ConfigOnlyCLI(PefttuneCLI):
    """The CLI's parsing (config composition, overrides, ``--print_config``, seeding), no trainer."""

    def __init__(self, *args: Any, build_data: bool = False, **kwargs: Any) -> None:
        self._build_data = build_data
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Nothing to refuse: nothing runs."""

    def instantiate_classes(self) -> None:
        """Only the model (and the data module when asked)."""
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(DualEncoderModule, "model", required=True)
        wanted = Namespace(model=self.config.model)
        if self._build_data:
            parser.add_subclass_arguments(ImageTextDataModule, "data", required=True)
            wanted["data"] = self.config.data
        try:
            built = parser.instantiate_classes(wanted)
        except (ValueError, TypeError) as error:
            key = _key_of_error(self.config, str(error))
            raise ConfigError(f"{key}: {_innermost(error)}" if key else str(error)) from error
        self.model = built.model
        self.datamodule = built.get("data")
        self.trainer = None  # type: ignore[assignment]


def parse_config(
    config: str | Sequence[str], overrides: Sequence[str] = (), build_data: bool = False
) -> tuple[DualEncoderModule, Any, Namespace]:
    """Build the model (and the data module) of a fit config with the CLI's own parser.

    Args:
        config: a config file or shipped config name, or several (composed in order, like repeated
            ``--config``).
        overrides: more command-line arguments, e.g. ``["--model.init_args.strategy.init_args.r=4"]``.
        build_data: also build the data module.

    Returns:
        ``(model, datamodule or None, parsed config)``; the config's ``seed_everything`` has been applied.
    """
    configs = [config] if isinstance(config, str) else list(config)
    argv = [argument for path in configs for argument in ("--config", resolve_config(path))]
    with warnings.catch_warnings():
        # The arguments are given on purpose, whatever the process's own command line holds.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        cli = _ConfigOnlyCLI(
            DualEncoderModule,
            ImageTextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[*argv, *overrides],
            run=False,
            build_data=build_data,
        )
    return cli.model, cli.datamodule, cli.config


def build_model_from_config(config_path: str, overrides: Sequence[str] = ()) -> DualEncoderModule:
    """Instantiate only the ``model`` section of a fit config (no trainer, no data), via the CLI's parser."""
    return parse_config(config_path, overrides)[0]


def inspect_main(argv: Sequence[str]) -> dict[str, Any] | None:
    """``pefttune inspect --config FILE [--no_weights] [--json] [--print_config] [KEY=VALUE overrides]``.

    Builds the model of a config with the same parser as ``fit`` and counts its parameters.
    """
    parser = argparse.ArgumentParser(prog="pefttune inspect", description=inspect_main.__doc__)
    parser.add_argument("--config", "-c", action="append", help="a fit config (file or shipped name)")
    parser.add_argument(
        "--no_weights", "--no-weights", action="store_true", help="build every tower from its architecture"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list_configs", "--list-configs", action="store_true", help="list shipped configs")
    options, overrides = parser.parse_known_args(list(argv))
    if options.list_configs:
        print("\n".join(packaged_configs()))
        return None
    if not options.config:
        parser.error("the following arguments are required: --config/-c")
    context = architecture_only() if options.no_weights else contextlib.nullcontext()
    with context:
        model = parse_config(options.config, overrides)[0]
    report = model.parameter_report()
    report["config"] = options.config[-1] if len(options.config) == 1 else options.config
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
