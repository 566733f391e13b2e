"""The ``pefttune`` console command: ``--help``, ``--version`` and dispatch to the subcommands.

Kept free of heavy imports, so that ``pefttune --help`` and ``pefttune --version`` answer at once; the
subcommands import Lightning and the models when they run (:mod:`pefttune.cli`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

DESCRIPTION = (
    "pefttune: train and compare parameter-efficient adaptation methods (DueT, Cross-Modal Adapter, LoRA, "
    "APEX, full fine-tuning, LiT) on image-text dual encoders"
)
#: Every subcommand and its one-line description (``pefttune --help``).
SUBCOMMANDS = {
    "fit": "train, then test the best checkpoint (LightningCLI)",
    "validate": "evaluate on the validation split (LightningCLI)",
    "test": "evaluate on the test split (LightningCLI)",
    "predict": "write image and text embeddings to a file (LightningCLI)",
    "inspect": "build the model of a config and count its parameters, per group and tower",
    "sweep": "run a benchmark suite, one process per run, then aggregate the results",
    "visualize": "draw text->image and image->text retrievals of a checkpoint as a PNG",
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Where the shipped configs are installed (``pefttune/configs`` links to the repository's ``configs``).
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


# -- configs -------------------------------------------------------------------------------------------------
def packaged_configs() -> list[str]:
    """Names of the shipped configs (``duet``, ``paper/lora_clip_vitb16``, ...), sorted."""
    names = []
    for folder, _, files in os.walk(PACKAGED_CONFIGS, followlinks=True):
        for file in files:
            if file.endswith(".yaml"):
                relative = os.path.relpath(os.path.join(folder, file), PACKAGED_CONFIGS)
                names.append(relative[: -len(".yaml")].replace(os.sep, "/"))
    return sorted(names)


def resolve_config(value: str) -> str:
    """A config path as given when it exists, else the shipped config of that name.

    ``duet``, ``duet.yaml``, ``configs/duet.yaml`` and ``paper/lora_clip_vitb16`` all name shipped configs,
    so the commands of the docs work from a ``pip install`` without a clone of the repository.
    """
    if os.path.exists(value) or value.startswith(("{", "[")) or "\n" in value:
        return value
    name = value.removeprefix("configs/").removesuffix(".yaml")
    candidate = os.path.join(PACKAGED_CONFIGS, *name.split("/")) + ".yaml"
    return candidate if os.path.isfile(candidate) else value


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """``argv`` with the value of every ``--config``/``-c`` passed through :func:`resolve_config`."""
    resolved = []
    take_next = False
    for argument in argv:
        if take_next:
            resolved.append(resolve_config(argument))
            take_next = False
        elif argument in ("--config", "-c"):
            resolved.append(argument)
            take_next = True
        elif argument.startswith("--config="):
            resolved.append("--config=" + resolve_config(argument.split("=", 1)[1]))
        else:
            resolved.append(argument)
    return resolved


def usage_error(subcommand: str | None, message: str) -> NoReturn:
    """Print ``pefttune SUBCOMMAND: error: MESSAGE`` as the last line and exit with status 2."""
    sys.stderr.write(f"pefttune {subcommand or ''}: error: {message}\n")
    raise SystemExit(2)


def _top_level_help() -> str:
    from pefttune import __version__

    lines = [
        f"usage: pefttune [-h] [--version] {{{','.join(SUBCOMMANDS)}}} ...",
        "",
        DESCRIPTION + f" (version {__version__}).",
        "",
        "subcommands (pefttune SUBCOMMAND --help for their options):",
    ]
    lines += [f"  {name:<10} {text}" for name, text in SUBCOMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help  show this help message and exit",
        "  --version   print the version and exit",
        "",
        "configs: --config takes a file or the name of a shipped config: "
        + ", ".join(packaged_configs()[:6])
        + ", ... (pefttune inspect --list_configs lists all)",
    ]
    return "\n".join(lines)


def console_main() -> None:
    """The ``pefttune`` console script: :func:`main` on ``sys.argv``, exit status 0 unless it raised.

    :func:`main` returns what a subcommand produced (the CLI object, the ``inspect`` report, the sweep's
    runs) for callers in Python; a console script's return value becomes the exit status, and any object
    other than None or an int would be printed and turned into status 1.
    """
    main()


def main(args: Sequence[str] | None = None) -> Any:
    """Run a ``pefttune`` subcommand and return its result (callable from Python and tests)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return None
    if argv[0] == "--version":
        from pefttune import __version__

        print(f"pefttune {__version__}")
        return None
    command, rest = argv[0], argv[1:]
    if command == "inspect":
        from pefttune.cli import inspect_main

        return inspect_main(rest)
    if command == "sweep":
        from pefttune.benchmark.sweep import sweep_main

        return sweep_main(resolve_config_arguments(rest))
    if command == "visualize":
        from pefttune.visualize import main as visualize_main

        return visualize_main(rest)
    if command not in LIGHTNING_SUBCOMMANDS and not command.startswith("-"):
        usage_error(None, f"unknown subcommand {command!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    from pefttune.cli import ConfigError, cli_main

    try:
        if args is None:
            # LightningCLI reads sys.argv itself (and warns when given both); shipped config names resolved.
            sys.argv[1:] = resolve_config_arguments(argv)
            return cli_main(None)
        return cli_main(argv)
    except ConfigError as error:
        usage_error(command, str(error))
