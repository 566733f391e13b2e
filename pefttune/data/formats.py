"""Readers for the image-caption formats users bring, each returning :class:`ImageCaptionRecord` lists.

Supported formats (``format`` names of :func:`read_records`):

- ``"karpathy"``: Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``):
  ``images[].{filepath?, filename, split, sentences[].raw, cocoid?, imgid?, class?}``. ``restval`` maps to
  ``train`` by default.
- ``"coco"``: COCO captions JSON (``images[].{id, file_name}``, ``annotations[].{image_id, caption}``); one
  file per split, so the caller names the split.
- ``"csv"``: CSV/TSV in the open_clip style: one row per image-caption pair, configurable columns; rows are
  grouped into one record per image (by ``group_column`` or by image path).
- ``"jsonl"``: JSON Lines, one object per line; the caption may be a string or a list of strings; objects are
  grouped per image like CSV rows. ``"json_list"`` reads a JSON file holding a list of such objects (the
  BLIP/LAVIS annotation layout).
- ``"webdataset"``: tar shards with ``key.jpg|jpeg|png|webp`` plus ``key.txt`` and/or ``key.json`` (a
  ``captions`` list, or ``caption``); brace patterns like ``shards-{000..009}.tar``, several patterns joined
  by ``::``. :func:`read_webdataset` indexes shards into records for evaluation; training streams them with
  :class:`pefttune.data.datasets.WebDatasetStream`.

Relative image paths are resolved against ``image_root``, or, when it is None, against the folder of the
annotation file. Problems are handled by ``on_error`` (see :mod:`pefttune.data.records`): the default raises
a :class:`DataFormatError` naming the file, the record and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from PIL import Image

from pefttune.data.records import (
    DataFormatError,
    ErrorPolicy,
    ImageCaptionRecord,
    ImageLoadError,
    OnError,
    SkipReport,
    validate_records,
)

logger = logging.getLogger(__name__)

Format = Literal["auto", "karpathy", "coco", "csv", "jsonl", "json_list", "webdataset"]
FORMATS: tuple[str, ...] = ("auto", "karpathy", "coco", "csv", "jsonl", "json_list", "webdataset")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_SEPARATOR_NAMES = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "pipes"}


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def read_text(path: str) -> str:
    """Read a UTF-8 text file (a leading byte-order mark is allowed).

    Args:
        path: File to read.

    Returns:
        The decoded text.

    Raises:
        DataFormatError: If the file is missing or is not valid UTF-8 (the message gives the byte offset).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DataFormatError(f"annotation file not found: {path}") from None
    return decode_utf8(data, path)


def decode_utf8(data: bytes, name: str) -> str:
    """Decode UTF-8 bytes, naming ``name`` and the byte offset of the first invalid byte on failure."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataFormatError(
            f"{name}: not valid UTF-8 at byte offset {offset} (line {line}, byte "
            f"{data[offset : offset + 1]!r}): {err.reason}; re-encode the file as UTF-8, e.g. "
            "`iconv -f latin1 -t utf-8`"
        ) from None


def parse_json(text: str, name: str) -> Any:
    """Parse JSON text; on failure the message gives ``name``, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{name}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None


def resolve_image_path(path: str, image_root: str | None, base_dir: str) -> str:
    """Resolve an image path from an annotation file.

    Args:
        path: Path as written in the annotation (``~`` is expanded).
        image_root: Folder relative paths are resolved against; None means ``base_dir``.
        base_dir: Folder of the annotation file.

    Returns:
        An absolute path, or a path relative to the working directory if ``base_dir`` is relative.
    """
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    root = os.path.expanduser(image_root) if image_root is not None else base_dir
    return os.path.join(root, expanded)


def _finish(
    records: list[ImageCaptionRecord],
    source: str,
    policy: ErrorPolicy,
    check_files: bool,
) -> list[ImageCaptionRecord]:
    """Validate a reader's records with the same policy and log what this source skipped."""
    valid = validate_records(
        records, source=source, on_error=policy.on_error, report=policy.report, check_files=check_files
    )
    skipped = policy.report.total - policy.report_total_at_start
    if skipped:
        logger.warning(
            "%s: skipped %d bad record(s) or caption(s) (on_error='skip'); kept %d images. %s",
            source,
            skipped,
            len(valid),
            policy.report.summary(),
        )
    return valid


def _string_value(value: Any) -> str | None:
    """Return ids and labels as strings (JSON ids are often ints); None for missing or unusable values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)):
        text = str(value).strip()
        return text or None
    return None


# ---------------------------------------------------------------------------------------------------------
# Karpathy split JSON


def read_karpathy_json(
    path: str,
    *,
    image_root: str | None = None,
    restval_split: str | None = "train",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
    parsed: Any = None,
) -> list[ImageCaptionRecord]:
    """Read a Karpathy-split JSON file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    The image id is ``cocoid``, else ``imgid``, else the image's relative path. The label is the optional
    ``class`` key (UCM-Captions has it).

    Args:
        path: The JSON file.
        image_root: Folder that ``filepath/filename`` is relative to; None means the JSON file's folder.
        restval_split: Split that ``restval`` images join (``"train"`` gives the usual 113k COCO training
            images); None keeps them as ``"restval"``.
        on_error: ``"raise"`` or ``"skip"`` (see :mod:`pefttune.data.records`).
        report: Collects skipped items.
        check_files: Whether to check that image files exist.
        parsed: The file's content if already parsed (:func:`read_records` passes it to avoid parsing twice).

    Returns:
        One record per image, all splits, in file order.

    Raises:
        DataFormatError: On malformed input, with ``on_error="raise"`` also on bad records.
    """
    data = parsed if parsed is not None else parse_json(read_text(path), path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(
            f"{path}: expected a JSON object with an 'images' list "
            "(Karpathy split format: images[].{filename, split, sentences[].raw})"
        )
    policy = ErrorPolicy(on_error, report)
    base_dir = os.path.dirname(os.path.abspath(path))
    records: list[ImageCaptionRecord] = []
    for index, entry in enumerate(data["images"]):
        where = f"{path}, images[{index}]"
        if not isinstance(entry, dict):
            policy.fail("bad_value", f"{where}: expected an object, got {type(entry).__name__}")
            continue
        filepath = entry.get("filepath") or ""
        filename = entry.get("filename")
        relative = os.path.join(filepath, filename) if isinstance(filename, str) and filename else None
        image_id = _string_value(entry.get("cocoid")) or _string_value(entry.get("imgid")) or relative
        name = f"{where} (image id {image_id!r})" if image_id else where
        missing = [key for key in ("filename", "split", "sentences") if key not in entry]
        if missing:
            policy.fail(
                "missing_key",
                f"{name}: missing key {missing[0]!r} (expected filename, split and sentences[].raw)",
            )
            continue
        if relative is None or not isinstance(filepath, str):
            policy.fail("bad_value", f"{name}: 'filename' and 'filepath' must be non-empty strings")
            continue
        split = _string_value(entry["split"])
        if split is None:
            policy.fail("bad_value", f"{name}: 'split' must be a non-empty string, got {entry['split']!r}")
            continue
        if split == "restval" and restval_split is not None:
            split = restval_split
        sentences = entry["sentences"]
        if not isinstance(sentences, list):
            policy.fail("bad_value", f"{name}: 'sentences' must be a list, got {type(sentences).__name__}")
            continue
        captions: list[Any] = []
        for position, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or "raw" not in sentence:
                policy.fail("bad_caption", f"{name}: sentences[{position}] has no key 'raw'")
                continue
            captions.append(sentence["raw"])
        records.append(
            ImageCaptionRecord(
                image_id=str(image_id),
                image=resolve_image_path(relative, image_root, base_dir),
                captions=captions,
                split=split,
                label=_string_value(entry.get("class")),
                origin=where,
            )
        )
    return _finish(records, path, policy, check_files)


# ---------------------------------------------------------------------------------------------------------
# COCO captions JSON


def read_coco_json(
    path: str,
    *,
    split: str = "train",
    image_root: str | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
    parsed: Any = None,
) -> list[ImageCaptionRecord]:
    """Read a COCO captions JSON file (``captions_val2014.json``, ``coco_test_karpathy.json``, ...).

    Annotations are grouped by ``image_id`` into one record per image, in the order of ``images``.

    Args:
        path: The JSON file.
        split: Split of every record (a COCO file holds one split).
        image_root: Folder ``file_name`` is relative to; None means the JSON file's folder.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items.
        check_files: Whether to check that image files exist.
        parsed: The file's content if already parsed.

    Returns:
        One record per listed image.

    Raises:
        DataFormatError: On malformed input, with ``on_error="raise"`` also on bad records.
    """
    data = parsed if parsed is not None else parse_json(read_text(path), path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object with 'images' and 'annotations' lists (COCO)")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataFormatError(f"{path}: missing list {key!r} (COCO captions format: images, annotations)")
    policy = ErrorPolicy(on_error, report)
    base_dir = os.path.dirname(os.path.abspath(path))
    by_id: dict[str, ImageCaptionRecord] = {}
    for index, entry in enumerate(data["images"]):
        where = f"{path}, images[{index}]"
        if not isinstance(entry, dict):
            policy.fail("bad_value", f"{where}: expected an object, got {type(entry).__name__}")
            continue
        missing = [key for key in ("id", "file_name") if key not in entry]
        if missing:
            policy.fail("missing_key", f"{where}: missing key {missing[0]!r} (expected id and file_name)")
            continue
        image_id = _string_value(entry["id"])
        file_name = entry["file_name"]
        if image_id is None or not isinstance(file_name, str) or not file_name:
            policy.fail("bad_value", f"{where}: 'id' must be an int or string and 'file_name' a string")
            continue
        if image_id in by_id:
            policy.fail(
                "duplicate_image_id",
                f"{where}: duplicate image id {image_id!r}, already used by {by_id[image_id].origin}",
            )
            continue
        by_id[image_id] = ImageCaptionRecord(
            image_id=image_id,
            image=resolve_image_path(file_name, image_root, base_dir),
            captions=[],
            split=split,
            origin=where,
        )
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}, annotations[{index}]"
        if not isinstance(annotation, dict):
            policy.fail("bad_caption", f"{where}: expected an object, got {type(annotation).__name__}")
            continue
        missing = [key for key in ("image_id", "caption") if key not in annotation]
        if missing:
            policy.fail("bad_caption", f"{where}: missing key {missing[0]!r} (expected image_id and caption)")
            continue
        image_id = _string_value(annotation["image_id"])
        if image_id not in by_id:
            policy.fail(
                "unknown_image_id", f"{where}: image_id {annotation['image_id']!r} is not in 'images'"
            )
            continue
        by_id[image_id].captions.append(annotation["caption"])
    return _finish(list(by_id.values()), path, policy, check_files)


# ---------------------------------------------------------------------------------------------------------
# Row-per-pair formats: CSV/TSV, JSON Lines, JSON list


class _RowGrouper:
    """Groups rows (one image-caption pair, or one image with a caption list) into records per image."""

    def __init__(self, path: str, policy: ErrorPolicy, image_root: str | None) -> None:
        self.path = path
        self.policy = policy
        self.image_root = image_root
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self.records: dict[str, ImageCaptionRecord] = {}

    def add(
        self,
        where: str,
        image: Any,
        captions: list[Any],
        group: Any,
        split: Any,
        label: Any,
    ) -> None:
        if not isinstance(image, str) or not image.strip():
            self.policy.fail("bad_value", f"{where}: image path must be a non-empty string, got {image!r}")
            return
        path = resolve_image_path(image.strip(), self.image_root, self.base_dir)
        key = _string_value(group) if group is not None else image.strip()
        if key is None:
            self.policy.fail(
                "bad_value", f"{where}: image id must be a non-empty string or int, got {group!r}"
            )
            return
        split_name = _string_value(split)
        if split_name is None:
            self.policy.fail("bad_value", f"{where}: split must be a non-empty string, got {split!r}")
            return
        label_name = _string_value(label)
        kept = []
        for position, caption in enumerate(captions):
            if not isinstance(caption, str):
                self.policy.fail(
                    "bad_caption", f"{where}: caption {position} must be a string, got {caption!r}"
                )
            elif not caption.strip():
                self.policy.fail("empty_caption", f"{where}: caption {position} is empty or whitespace-only")
            else:
                kept.append(caption)
        record = self.records.get(key)
        if record is None:
            self.records[key] = ImageCaptionRecord(
                image_id=key, image=path, captions=kept, split=split_name, label=label_name, origin=where
            )
            return
        if record.image != path:
            self.policy.fail(
                "duplicate_image_id",
                f"{where}: duplicate image id {key!r} with a different image ({image.strip()!r}); "
                f"{record.origin} has {record.image!r}",
            )
        elif record.split != split_name or record.label != label_name:
            self.policy.fail(
                "conflicting_values",
                f"{where}: image {key!r} has split {split_name!r} and label {label_name!r}, but "
                f"{record.origin} gave split {record.split!r} and label {record.label!r}",
            )
        else:
            record.captions.extend(kept)


def _header_hint(header_line: str, separator: str) -> str:
    for other, name in _SEPARATOR_NAMES.items():
        if other != separator and other in header_line:
            return (
                f"; the header contains {name}, so the file looks {name[:-1]}-separated but separator="
                f"{separator!r} was used: pass separator={other!r}"
            )
    return ""


def read_csv(
    path: str,
    *,
    image_column: str = "filepath",
    caption_column: str = "title",
    group_column: str | None = None,
    split_column: str | None = None,
    label_column: str | None = None,
    separator: str | None = None,
    split: str = "train",
    image_root: str | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
) -> list[ImageCaptionRecord]:
    """Read a CSV/TSV file with one row per image-caption pair (the open_clip layout).

    Rows of the same image (same ``group_column`` value, or the same path when there is no group column)
    become one record with all their captions. Header names are stripped of surrounding spaces.

    Args:
        path: The CSV or TSV file.
        image_column: Column of image paths (open_clip's ``--csv-img-key``).
        caption_column: Column of captions (open_clip's ``--csv-caption-key``).
        group_column: Optional column of image ids; without it rows are grouped by image path.
        split_column: Optional column of split names; without it every row is in ``split``.
        label_column: Optional column of class names.
        separator: Field separator. None picks by extension (tab for ``.tsv``/``.tab``, else comma) and falls
            back to the other one if the header then lacks the required columns. An explicit separator is
            used as given; if the columns are missing and the header contains another separator, the error
            says so.
        split: Split of every row when ``split_column`` is None.
        image_root: Folder image paths are relative to; None means the CSV file's folder.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items.
        check_files: Whether to check that image files exist.

    Returns:
        One record per image, in order of first appearance.

    Raises:
        DataFormatError: On a missing column, with ``on_error="raise"`` also on bad rows.
    """
    text = read_text(path)
    header_line = text.split("\n", 1)[0]
    required = [image_column, caption_column] + [
        column for column in (group_column, split_column, label_column) if column is not None
    ]
    if separator is None:
        preferred = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
        candidates = [preferred, "," if preferred == "\t" else "\t"]
        header_cells = [[cell.strip() for cell in _first_row(header_line, sep)] for sep in candidates]
        chosen = next(
            (index for index, cells in enumerate(header_cells) if all(col in cells for col in required)), 0
        )
        separator = candidates[chosen]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
    try:
        header = [cell.strip() for cell in next(reader, [])]
        rows = [(row, reader.line_num) for row in reader]  # line_num: the line a row ends on
    except csv.Error as err:
        raise DataFormatError(f"{path}, line {reader.line_num}: malformed CSV: {err}") from None
    for column in required:
        if column not in header:
            raise DataFormatError(
                f"{path}: column {column!r} not found in the header (columns: {header})"
                + _header_hint(header_line, separator)
            )
    position = {column: header.index(column) for column in required}
    policy = ErrorPolicy(on_error, report)
    grouper = _RowGrouper(path, policy, image_root)
    row_number = 0
    for row, line in rows:
        if not row:
            continue  # a blank line holds no record
        row_number += 1
        where = f"{path}, row {row_number} (line {line})"
        if len(row) != len(header):
            policy.fail(
                "missing_key" if len(row) < len(header) else "bad_value",
                f"{where}: {len(row)} fields, expected {len(header)} as in the header "
                f"(check quoting and the separator {separator!r})",
            )
            continue
        grouper.add(
            where,
            image=row[position[image_column]],
            captions=[row[position[caption_column]]],
            group=row[position[group_column]] if group_column is not None else None,
            split=row[position[split_column]] if split_column is not None else split,
            label=row[position[label_column]] if label_column is not None else None,
        )
    return _finish(list(grouper.records.values()), path, policy, check_files)


def _first_row(line: str, separator: str) -> list[str]:
    return next(csv.reader([line], delimiter=separator), [])


def _records_from_objects(
    objects: Iterable[tuple[str, Any]],
    path: str,
    *,
    image_key: str,
    caption_key: str,
    id_key: str | None,
    split_key: str | None,
    label_key: str | None,
    split: str,
    image_root: str | None,
    policy: ErrorPolicy,
) -> list[ImageCaptionRecord]:
    grouper = _RowGrouper(path, policy, image_root)
    for where, obj in objects:
        if not isinstance(obj, dict):
            policy.fail("bad_value", f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        required = [image_key, caption_key] + [key for key in (id_key, split_key) if key is not None]
        missing = [key for key in required if key not in obj]
        if missing:
            policy.fail("missing_key", f"{where}: missing key {missing[0]!r} (expected keys {required})")
            continue
        caption = obj[caption_key]
        grouper.add(
            where,
            image=obj[image_key],
            captions=caption if isinstance(caption, list) else [caption],
            group=obj[id_key] if id_key is not None else None,
            split=obj[split_key] if split_key is not None else split,
            label=obj.get(label_key) if label_key is not None else None,
        )
    return list(grouper.records.values())


def read_jsonl(
    path: str,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    id_key: str | None = None,
    split_key: str | None = None,
    label_key: str | None = None,
    split: str = "train",
    image_root: str | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
) -> list[ImageCaptionRecord]:
    """Read JSON Lines: one object per line, the caption a string or a list of strings.

    Lines of the same image (same ``id_key`` value, or the same path) are grouped into one record. Blank lines
    are ignored. A malformed line raises even under ``on_error="skip"``: the error gives its line and column.

    Args:
        path: The ``.jsonl`` file.
        image_key: Key of the image path.
        caption_key: Key of the caption or caption list.
        id_key: Optional key of the image id; without it objects are grouped by image path.
        split_key: Optional key of the split name; without it every object is in ``split``.
        label_key: Optional key of the class name (may be absent from some objects).
        split: Split of every object when ``split_key`` is None.
        image_root: Folder image paths are relative to; None means the file's folder.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items.
        check_files: Whether to check that image files exist.

    Returns:
        One record per image, in order of first appearance.

    Raises:
        DataFormatError: On malformed input, with ``on_error="raise"`` also on bad records.
    """
    text = read_text(path)

    def objects() -> Iterator[tuple[str, Any]]:
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield f"{path}, line {number}", parse_json(line, f"{path}, line {number}")

    policy = ErrorPolicy(on_error, report)
    records = _records_from_objects(
        objects(),
        path,
        image_key=image_key,
        caption_key=caption_key,
        id_key=id_key,
        split_key=split_key,
        label_key=label_key,
        split=split,
        image_root=image_root,
        policy=policy,
    )
    return _finish(records, path, policy, check_files)


def read_json_list(
    path: str,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    id_key: str | None = None,
    split_key: str | None = None,
    label_key: str | None = None,
    split: str = "train",
    image_root: str | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
    parsed: Any = None,
) -> list[ImageCaptionRecord]:
    """Read a JSON file holding a list of objects (the BLIP/LAVIS annotation layout).

    Same keys and grouping as :func:`read_jsonl`; e.g. LAVIS ``coco_karpathy_test.json`` rows are
    ``{"image": "val2014/...jpg", "caption": [5 strings]}``.

    Args:
        path: The ``.json`` file.
        image_key: Key of the image path.
        caption_key: Key of the caption or caption list.
        id_key: Optional key of the image id; without it objects are grouped by image path.
        split_key: Optional key of the split name.
        label_key: Optional key of the class name.
        split: Split of every object when ``split_key`` is None.
        image_root: Folder image paths are relative to; None means the file's folder.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items.
        check_files: Whether to check that image files exist.
        parsed: The file's content if already parsed.

    Returns:
        One record per image, in order of first appearance.

    Raises:
        DataFormatError: On malformed input, with ``on_error="raise"`` also on bad records.
    """
    data = parsed if parsed is not None else parse_json(read_text(path), path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    policy = ErrorPolicy(on_error, report)
    records = _records_from_objects(
        ((f"{path}, [{index}]", obj) for index, obj in enumerate(data)),
        path,
        image_key=image_key,
        caption_key=caption_key,
        id_key=id_key,
        split_key=split_key,
        label_key=label_key,
        split=split,
        image_root=image_root,
        policy=policy,
    )
    return _finish(records, path, policy, check_files)


# ---------------------------------------------------------------------------------------------------------
# WebDataset tar shards


def expand_shards(pattern: str) -> list[str]:
    """Expand a shard pattern into shard URLs.

    Supports brace lists (``{a,b}``), zero-padded numeric ranges (``{000..099}``), several braces per pattern
    (nested too) and several patterns joined by ``::``.

    Args:
        pattern: E.g. ``"data/train-{0000..0099}.tar::extra/{a,b}.tar"``.

    Returns:
        The URLs in order.

    Raises:
        DataFormatError: On unbalanced braces.
    """
    urls: list[str] = []
    for part in pattern.split("::"):
        if part:
            urls.extend(_expand_braces(part, pattern))
    return urls


def _expand_braces(text: str, pattern: str) -> list[str]:
    start = text.find("{")
    if start < 0:
        if "}" in text:
            raise DataFormatError(f"shard pattern {pattern!r}: unbalanced '}}'")
        return [text]
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    else:
        raise DataFormatError(f"shard pattern {pattern!r}: unbalanced '{{'")
    prefix, body, rest = text[:start], text[start + 1 : end], text[end + 1 :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = _split_top_level(body)
        if len(choices) == 1:  # "{x}" is not an alternative: keep the braces literally
            choices = ["{" + body + "}"]
    tails = _expand_braces(rest, pattern)
    return [
        head + tail
        for choice in choices
        for head in _expand_braces(prefix + choice, pattern)
        for tail in tails
    ]


def _split_top_level(body: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file:") :] if url.startswith("file:") and "://" not in url else url


def missing_local_shards(urls: Iterable[str]) -> list[str]:
    """The local shard paths among ``urls`` that do not exist (remote URLs and ``pipe:`` are not checked)."""
    return [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]


def open_shard(url: str) -> BinaryIO:
    """Open a shard for streaming: local paths directly, URLs and ``pipe:`` commands via ``webdataset``."""
    if _is_local(url):
        try:
            return open(_local_path(url), "rb")
        except FileNotFoundError:
            raise DataFormatError(f"WebDataset shard not found: {url}") from None
    import webdataset  # only remote shards need it; local ones are plain tar files

    return webdataset.gopen(url, "rb")


@dataclass(frozen=True)
class TarMemberImage:
    """A lazy reference to an image inside an uncompressed local tar shard (picklable for workers).

    Attributes:
        shard: Path of the tar file.
        member: Name of the member, for messages.
        offset: Byte offset of the member's data in the file.
        size: Size of the member's data in bytes.
    """

    shard: str
    member: str
    offset: int
    size: int

    def __call__(self) -> Image.Image:
        """Read the member's bytes and open them as an image (decoding happens on ``load()``)."""
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise ImageLoadError(f"{self.shard}: member {self.member!r} is truncated")
        return Image.open(io.BytesIO(data))


def _split_member_name(name: str) -> tuple[str, str] | None:
    """Split ``dir/key.ext.more`` into (``dir/key``, ``ext.more``) as WebDataset does."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _is_plain_tar(path: str) -> bool:
    """Whether the file is an uncompressed tar, whose member offsets can be seeked to later."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    return len(head) == 512 and head[257:262] == b"ustar"


def iter_tar_samples(
    url: str,
    *,
    lazy_images: bool = False,
    policy: ErrorPolicy | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream a tar shard as WebDataset samples: files with the same key, consecutive in the archive.

    Args:
        url: Local path, URL or ``pipe:`` command.
        lazy_images: For a local uncompressed tar, give images as :class:`TarMemberImage` references
            instead of reading their bytes.
        policy: Under ``on_error="skip"``, a shard that cannot be read to its end is recorded and the samples
            read so far are kept; otherwise the error is raised.

    Yields:
        ``(key, {extension: bytes or TarMemberImage})``.

    Raises:
        DataFormatError: If the shard is missing or not a readable tar file.
    """
    path = _local_path(url)
    lazy = lazy_images and _is_local(url) and os.path.isfile(path) and _is_plain_tar(path)
    key: str | None = None
    files: dict[str, Any] = {}
    count = 0
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                parts = _split_member_name(member.name) if member.isfile() else None
                if parts is None:
                    continue  # directories and files outside the key.ext convention carry no sample
                member_key, extension = parts
                if member_key != key:
                    if key is not None:
                        count += 1
                        yield key, files
                    key, files = member_key, {}
                if lazy and extension in IMAGE_EXTENSIONS:
                    files[extension] = TarMemberImage(path, member.name, member.offset_data, member.size)
                else:
                    extracted = archive.extractfile(member)
                    files[extension] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, DataFormatError):
            raise
        message = f"{url}: not a readable tar shard after {count} sample(s): {type(err).__name__}: {err}"
        if policy is None:
            raise DataFormatError(message) from err
        policy.fail("bad_sample", message)
        return
    if key is not None:
        yield key, files


def sample_to_record(
    url: str,
    key: str,
    files: dict[str, Any],
    *,
    split: str,
    policy: ErrorPolicy,
) -> ImageCaptionRecord | None:
    """Turn one WebDataset sample into a record, or report it and return None.

    The image is the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp``. Captions come from the JSON sidecar
    (``captions`` list, or ``caption`` string or list) when it has them, else from ``.txt`` (the whole text is
    one caption). The label is the sidecar's ``label`` or ``class``. The image id is the sample key, which
    must be unique across shards (img2dataset and ``webdataset`` writers make it so).

    Args:
        url: The shard, for messages.
        key: The sample key.
        files: ``{extension: bytes or TarMemberImage}``.
        split: Split of the record.
        policy: Error policy.

    Returns:
        The record (captions not yet validated), or None if the sample was skipped.
    """
    where = f"{url}, sample {key!r}"
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image is None:
        found = ", ".join(f".{ext}" for ext in sorted(files)) or "nothing"
        policy.fail("bad_sample", f"{where}: no image (expected .jpg, .jpeg, .png or .webp; found {found})")
        return None
    captions: list[Any] = []
    label = None
    try:
        if "json" in files:
            meta = parse_json(decode_utf8(files["json"], f"{where} .json"), f"{where} .json")
            if isinstance(meta, dict):
                found_captions = meta.get("captions", meta.get("caption"))
                if found_captions is not None:
                    captions = found_captions if isinstance(found_captions, list) else [found_captions]
                label = _string_value(meta.get("label", meta.get("class")))
        if not captions and "txt" in files:
            captions = [decode_utf8(files["txt"], f"{where} .txt")]
    except DataFormatError as err:
        policy.fail("bad_sample", str(err))
        return None
    if not captions:
        policy.fail(
            "no_captions",
            f"{where}: no caption (expected .txt, or .json with a 'captions' list or 'caption')",
        )
        return None
    return ImageCaptionRecord(
        image_id=key, image=image, captions=captions, split=split, label=label, origin=where
    )


def read_webdataset(
    pattern: str,
    *,
    split: str = "train",
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[ImageCaptionRecord]:
    """Index WebDataset shards into records (for evaluation sets, which are read as a whole).

    Images of local uncompressed shards stay on disk as :class:`TarMemberImage` references; other shards'
    images are held in memory as bytes. Training on large shard sets should stream instead
    (:class:`pefttune.data.datasets.WebDatasetStream`).

    Args:
        pattern: Shard pattern (see :func:`expand_shards`).
        split: Split of every record.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items.

    Returns:
        One record per sample, in shard order.

    Raises:
        DataFormatError: On missing or unreadable shards, with ``on_error="raise"`` also on bad samples.
    """
    policy = ErrorPolicy(on_error, report)
    records: list[ImageCaptionRecord] = []
    for url in expand_shards(pattern):
        for key, files in iter_tar_samples(url, lazy_images=True, policy=policy):
            record = sample_to_record(url, key, files, split=split, policy=policy)
            if record is not None:
                records.append(record)
    return _finish(records, pattern, policy, check_files=False)


# ---------------------------------------------------------------------------------------------------------
# Dispatch


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
    """Guess the format of an annotation file or shard pattern from its name and, for JSON, its content.

    Args:
        path: File path or shard pattern.

    Returns:
        One of ``"karpathy"``, ``"coco"``, ``"csv"``, ``"jsonl"``, ``"json_list"``, ``"webdataset"``.

    Raises:
        DataFormatError: If the format cannot be told.
    """
    if is_shard_pattern(path):
        return "webdataset"
    lowered = path.lower()
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lowered.endswith((".csv", ".tsv", ".tab")):
        return "csv"
    if lowered.endswith(".json"):
        return _json_layout(parse_json(read_text(path), path), path)
    raise DataFormatError(
        f"{path}: cannot tell the format from the name; pass format= one of {', '.join(FORMATS[1:])}"
    )


def _json_layout(data: Any, path: str) -> str:
    if isinstance(data, list):
        return "json_list"
    if isinstance(data, dict) and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and "images" in data:
        return "karpathy"
    raise DataFormatError(
        f"{path}: cannot tell the JSON layout (expected a Karpathy object with 'images', a COCO object "
        "with 'images' and 'annotations', or a list of objects); pass format=..."
    )


def read_records(
    path: str,
    format: Format = "auto",
    *,
    split: str = "train",
    image_root: str | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
    restval_split: str | None = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
    label_column: str | None = None,
    separator: str | None = None,
) -> list[ImageCaptionRecord]:
    """Read any supported format into records.

    Args:
        path: Annotation file or shard pattern.
        format: A name from :data:`FORMATS`; ``"auto"`` uses :func:`detect_format`.
        split: Split of records whose format carries none (COCO, WebDataset, CSV/JSONL without a split
            column). Karpathy files carry their own splits.
        image_root: Folder relative image paths are resolved against; None means the annotation's folder.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items.
        check_files: Whether to check that image files exist.
        restval_split: Karpathy only: split that ``restval`` images join.
        image_column: CSV column / JSON key of the image path (default ``filepath`` for CSV, ``image`` for
            JSON).
        caption_column: CSV column / JSON key of the caption (default ``title`` for CSV, ``caption`` for
            JSON).
        group_column: CSV column / JSON key of the image id (optional).
        split_column: CSV column / JSON key of the split (optional).
        label_column: CSV column / JSON key of the class name (optional).
        separator: CSV separator (see :func:`read_csv`).

    Returns:
        The records of all splits in the source.

    Raises:
        DataFormatError: On bad input (see the readers).
    """
    if format not in FORMATS:
        raise DataFormatError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    parsed = None
    if format == "auto" and not is_shard_pattern(path) and path.lower().endswith(".json"):
        parsed = parse_json(read_text(path), path)  # parsed once: to detect the layout and to read it
        chosen = _json_layout(parsed, path)
    else:
        chosen = detect_format(path) if format == "auto" else format
    common: dict[str, Any] = {"on_error": on_error, "report": report}
    if chosen == "webdataset":
        return read_webdataset(path, split=split, **common)
    common.update(image_root=image_root, check_files=check_files)
    if chosen in ("karpathy", "coco", "json_list"):
        common["parsed"] = parsed
    if chosen == "karpathy":
        return read_karpathy_json(path, restval_split=restval_split, **common)
    if chosen == "coco":
        return read_coco_json(path, split=split, **common)
    if chosen == "csv":
        return read_csv(
            path,
            image_column=image_column or "filepath",
            caption_column=caption_column or "title",
            group_column=group_column,
            split_column=split_column,
            label_column=label_column,
            separator=separator,
            split=split,
            **common,
        )
    reader = read_jsonl if chosen == "jsonl" else read_json_list
    return reader(
        path,
        image_key=image_column or "image",
        caption_key=caption_column or "caption",
        id_key=group_column,
        split_key=split_column,
        label_key=label_column,
        split=split,
        **common,
    )
