"""The deprecated string form of a data module's source, converted to a source object with a warning.

Before the sources, a data module took ``source: synthetic`` or ``source: <file or shard pattern>`` plus
``format``, ``image_root``, column names, ``synthetic_*``, ``samples_per_epoch`` and ``shuffle_buffer`` as its
own arguments. Those configs keep working: :func:`legacy_source` builds the equivalent source and warns
(``FutureWarning``, shown by default) with the ``class_path`` form to write instead.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import TYPE_CHECKING, Any

from pefttune.data.records import DataFormatError
from pefttune.data.sources.base import Source
from pefttune.data.sources.coco import Coco
from pefttune.data.sources.files import parse_json, read_text
from pefttune.data.sources.image_folder import ImageFolder
from pefttune.data.sources.karpathy import Karpathy
from pefttune.data.sources.msrvtt import MSRVTT
from pefttune.data.sources.synthetic import Synthetic
from pefttune.data.sources.table import Table
from pefttune.data.sources.webdataset import WebDataset

if TYPE_CHECKING:
    from pefttune.data.datamodule import ImageTextDataModule

#: The data-module arguments that became source arguments (accepted with a warning).
LEGACY_OPTIONS: tuple[str, ...] = (
    "format",
    "image_root",
    "restval_split",
    "image_column",
    "caption_column",
    "group_column",
    "split_column",
    "label_column",
    "separator",
    "check_files",
    "samples_per_epoch",
    "shuffle_buffer",
    "synthetic_train",
    "synthetic_val",
    "synthetic_test",
    "synthetic_image_size",
)
FORMATS: tuple[str, ...] = (
    "auto",
    "karpathy",
    "coco",
    "csv",
    "jsonl",
    "json_list",
    "webdataset",
    "image_folder",
)


def is_shard_pattern(path: str) -> bool:
    """Whether ``path`` names WebDataset shards (a tar file, a brace pattern, ``::`` or a ``pipe:``)."""
    lowered = path.lower()
    return (
        lowered.endswith((".tar", ".tar.gz", ".tgz"))
        or "::" in path
        or path.startswith("pipe:")
        or bool(re.search(r"\{[^}]*(,|\.\.)[^}]*\}", path))
    )


def detect_format(path: str) -> str:
    """Guess the format of a path from its name and, for JSON, its layout (see :data:`FORMATS`).

    Raises:
        DataFormatError: If the format cannot be told.
    """
    if is_shard_pattern(path):
        return "webdataset"
    if os.path.isdir(path):
        return "image_folder"
    lowered = path.lower()
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lowered.endswith((".csv", ".tsv", ".tab")):
        return "csv"
    if lowered.endswith(".json"):
        data = parse_json(read_text(path), path)
        if isinstance(data, list):
            return "json_list"
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict) and "videos" in data and "sentences" in data:
            return "msrvtt"
        if isinstance(data, dict) and "images" in data:
            return "karpathy"
        raise DataFormatError(
            f"{path}: cannot tell the JSON layout (expected a Karpathy object with 'images', a COCO object "
            "with 'images' and 'annotations', or a list of objects); pass format=... or, better, a source "
            "class (see docs/datasets.md)"
        )
    raise DataFormatError(
        f"{path}: cannot tell the format from the name; pass format= one of {', '.join(FORMATS[1:])} or, "
        "better, a source class (see docs/datasets.md)"
    )


def legacy_source(
    value: str,
    name: str,
    options: dict[str, Any],
    seed: int,
    module: ImageTextDataModule,
    base: Synthetic | None = None,
) -> Source:
    """Build the source a deprecated string ``source`` (and its options) meant, and warn.

    Args:
        value: ``"synthetic"``, an annotation file, an image folder or a shard pattern.
        name: The argument it was given as (``source``, ``val_source``, ``test_source``).
        options: The deprecated options given (see :data:`LEGACY_OPTIONS`), None ones left out.
        seed: The data module's seed (the synthetic data's seed, as before).
        module: The data module (its ``default_held_out_fraction`` and ``legacy_table_options``).
        base: A :class:`Synthetic` source whose other settings the ``synthetic_*`` options keep.

    Returns:
        The source.

    Raises:
        DataFormatError: If the format cannot be told or is unknown.
    """
    fmt = options.get("format", "auto")
    if fmt not in FORMATS:
        raise DataFormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if value == "synthetic":
        sizes = base.sizes if base is not None else {"train": 512, "val": 64, "test": 128}
        init: dict[str, Any] = {
            "num_train": options.get("synthetic_train", sizes["train"]),
            "num_val": options.get("synthetic_val", sizes["val"]),
            "num_test": options.get("synthetic_test", sizes["test"]),
            "image_size": options.get("synthetic_image_size", base.image_size if base is not None else 64),
            "seed": seed,
            "held_out_fraction": base.held_out_fraction
            if base is not None
            else module.default_held_out_fraction,
        }
        source: Source = Synthetic(**init)
    else:
        chosen = detect_format(value) if fmt == "auto" else fmt
        files = {"check_files": options["check_files"]} if "check_files" in options else {}
        root = {"image_root": options["image_root"]} if "image_root" in options else {}
        if chosen == "webdataset":
            init = {"urls": value}
            init.update(
                {key: options[key] for key in ("samples_per_epoch", "shuffle_buffer") if key in options}
            )
            source = WebDataset(**init)
        elif chosen == "image_folder":
            init = {"root": value}
            source = ImageFolder(**init)
        elif chosen == "karpathy":
            init = {"path": value, **root, **files}
            if "restval_split" in options:
                init["restval_split"] = options["restval_split"]
            source = Karpathy(**init)
        elif chosen == "coco":
            init = {"path": value, **root, **files}
            source = Coco(**init)
        elif chosen == "msrvtt":
            init = {"annotations": value, **files}
            if "image_root" in options:
                init["media_root"] = options["image_root"]
            source = MSRVTT(**init)
        else:
            init = {"path": value, "format": chosen, **root, **files}
            for key in ("image_column", "caption_column", "group_column", "split_column", "label_column"):
                if key in options:
                    init[key] = options[key]
            init.update(module.legacy_table_options(options))
            if "separator" in options:
                init["separator"] = options["separator"]
            source = Table(**init)
    shown = ", ".join(f"{key}: {val!r}" for key, val in init.items())
    given = ", ".join(sorted(key for key in options if key in LEGACY_OPTIONS))
    warnings.warn(
        f"{type(module).__name__}: {name}={value!r}"
        + (f" with {given}" if given else "")
        + " is deprecated; write "
        + f"{name}: {{class_path: pefttune.data.sources.{type(source).__name__}, init_args: {{{shown}}}}}",
        FutureWarning,
        stacklevel=4,
    )
    return source
