"""Tables of image (or video) paths and captions: CSV/TSV, JSON Lines and JSON lists.

- CSV/TSV in the open_clip style: one row per image-caption pair (``filepath``, ``title`` by default).
- JSON Lines: one object per line; the caption may be a string or a list of strings (``image``, ``caption``).
- JSON list: a JSON file holding a list of such objects (the BLIP/LAVIS annotation layout).

Rows of the same item (same ``group_column`` value, or the same path) become one record with all their
captions. :class:`VideoTable` reads the same layouts with a ``video`` column naming a video file or a folder
of frames.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord, ImageSource
from pefttune.data.sources.files import FileSource, parse_json, read_text, string_value

TableFormat = Literal["auto", "csv", "jsonl", "json_list"]
_SEPARATOR_NAMES = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "pipes"}


class Table(FileSource):
    """A CSV/TSV, JSON Lines or JSON-list file of image paths and captions.

    Args:
        path: The file.
        format: ``"csv"`` (also TSV), ``"jsonl"``, ``"json_list"``, or ``"auto"``: by extension (``.csv``,
            ``.tsv``, ``.tab``: CSV; ``.jsonl``, ``.ndjson``: JSON Lines; ``.json``: JSON list).
        image_column: Column / key of the image path; None means ``filepath`` (CSV) or ``image`` (JSON).
        caption_column: Column / key of the caption (JSON: a string or a list of strings); None means
            ``title`` (CSV) or ``caption`` (JSON). For classification data without captions, name the label
            column here too.
        group_column: Optional column / key of the item id grouping several rows; None groups by path.
        split_column: Optional column / key of the split name; None puts every row in the split read for.
        label_column: Optional column / key of the class name (zero-shot classification).
        separator: CSV field separator. None picks by extension (tab for ``.tsv``/``.tab``, else comma) and
            falls back to the other one if the header then lacks the required columns.
        image_root: Folder relative paths are resolved against; None means the file's folder.
        check_files: Check at setup that the files exist.
    """

    #: Default column / key of the path, for CSV and for JSON.
    default_columns: tuple[str, str] = ("filepath", "image")
    #: What the path column names, for messages.
    item_name: str = "image"

    def __init__(
        self,
        path: str,
        format: TableFormat = "auto",
        image_column: str | None = None,
        caption_column: str | None = None,
        group_column: str | None = None,
        split_column: str | None = None,
        label_column: str | None = None,
        separator: str | None = None,
        image_root: str | None = None,
        check_files: bool = True,
    ) -> None:
        super().__init__(path, image_root, check_files)
        if format not in ("auto", "csv", "jsonl", "json_list"):
            raise ValueError(f"format must be auto, csv, jsonl or json_list; got {format!r}")
        self.format = format
        self.image_column = image_column
        self.caption_column = caption_column
        self.group_column = group_column
        self.split_column = split_column
        self.label_column = label_column
        self.separator = separator

    @property
    def resolved_format(self) -> str:
        """The format, ``"auto"`` resolved by the file's extension."""
        if self.format != "auto":
            return self.format
        lowered = self.path.lower()
        if lowered.endswith((".csv", ".tsv", ".tab")):
            return "csv"
        if lowered.endswith((".jsonl", ".ndjson")):
            return "jsonl"
        if lowered.endswith(".json"):
            return "json_list"
        raise DataFormatError(
            f"{self.path}: cannot tell the table format from the extension; pass format= csv, jsonl "
            "or json_list"
        )

    def visual(self, path: str) -> ImageSource:
        """The record's ``image`` for a resolved path (a path; :class:`VideoTable` makes a video)."""
        return path

    def read(self, split: str, policy: ErrorPolicy, parsed: Any = None) -> list[ImageCaptionRecord]:
        """One record per item, in order of first appearance."""
        chosen = self.resolved_format
        grouper = _RowGrouper(self, policy)
        if chosen == "csv":
            self._read_csv(grouper, split, policy)
        else:
            if chosen == "jsonl":
                text = read_text(self.path)
                objects: Iterable[tuple[str, Any]] = self._jsonl_objects(text)
            else:
                data = parsed if parsed is not None else parse_json(read_text(self.path), self.path)
                if not isinstance(data, list):
                    raise DataFormatError(
                        f"{self.path}: expected a JSON list of objects, got {type(data).__name__}"
                    )
                objects = ((f"{self.path}, [{index}]", obj) for index, obj in enumerate(data))
            self._read_objects(objects, grouper, split, policy)
        return list(grouper.records.values())

    # -----------------------------------------------------------------------------------------------------

    def _jsonl_objects(self, text: str) -> Iterator[tuple[str, Any]]:
        # A malformed line raises even under on_error="skip": the error gives its line and column.
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield f"{self.path}, line {number}", parse_json(line, f"{self.path}, line {number}")

    def _read_objects(
        self, objects: Iterable[tuple[str, Any]], grouper: _RowGrouper, split: str, policy: ErrorPolicy
    ) -> None:
        image_key = self.image_column or self.default_columns[1]
        caption_key = self.caption_column or "caption"
        id_key, split_key, label_key = self.group_column, self.split_column, self.label_column
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

    def _read_csv(self, grouper: _RowGrouper, split: str, policy: ErrorPolicy) -> None:
        path = self.path
        image_column = self.image_column or self.default_columns[0]
        caption_column = self.caption_column or "title"
        group_column, split_column, label_column = self.group_column, self.split_column, self.label_column
        text = read_text(path)
        header_line = text.split("\n", 1)[0]
        required = [image_column, caption_column] + [
            column for column in (group_column, split_column, label_column) if column is not None
        ]
        separator = self.separator
        if separator is None:
            preferred = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
            candidates = [preferred, "," if preferred == "\t" else "\t"]
            header_cells = [[cell.strip() for cell in _first_row(header_line, sep)] for sep in candidates]
            chosen = next(
                (index for index, cells in enumerate(header_cells) if all(col in cells for col in required)),
                0,
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


class VideoTable(Table):
    """A CSV/TSV, JSON Lines or JSON-list file of videos and captions.

    Each row names a ``video`` (column / key ``video`` by default, in CSV and JSON alike): a video file
    (``.mp4``, ``.webm``, ...; decoded with PyAV) or a folder of frame images, relative to ``video_root`` (or
    the file's folder). Captions, grouping, splits and labels are as for :class:`Table`; the video id is the
    ``group_column`` value or the path. Example JSON Lines row: ``{"video": "clips/v12.mp4", "caption": ["a
    man cooks", "someone is cooking"]}``.

    Args:
        path: The file.
        format: See :class:`Table`.
        video_column: Column / key of the video path (default ``video``).
        caption_column: Column / key of the caption(s) (default ``title`` for CSV, ``caption`` for JSON).
        group_column: Optional column / key of the video id.
        split_column: Optional column / key of the split name.
        label_column: Optional column / key of a class name.
        separator: CSV separator (see :class:`Table`).
        video_root: Folder relative video paths are resolved against; None means the file's folder.
        check_files: Check at setup that each video file or frame folder exists.
    """

    default_columns = ("video", "video")
    item_name = "video"

    def __init__(
        self,
        path: str,
        format: TableFormat = "auto",
        video_column: str | None = None,
        caption_column: str | None = None,
        group_column: str | None = None,
        split_column: str | None = None,
        label_column: str | None = None,
        separator: str | None = None,
        video_root: str | None = None,
        check_files: bool = True,
    ) -> None:
        super().__init__(
            path,
            format=format,
            image_column=video_column,
            caption_column=caption_column,
            group_column=group_column,
            split_column=split_column,
            label_column=label_column,
            separator=separator,
            image_root=video_root,
            check_files=check_files,
        )

    def visual(self, path: str) -> ImageSource:
        """A frame folder or a video file (see :func:`~pefttune.data.video.video_from_path`)."""
        from pefttune.data.video import video_from_path

        return video_from_path(path)

    def read(self, split: str, policy: ErrorPolicy, parsed: Any = None) -> list[ImageCaptionRecord]:
        """One record per video; with ``check_files``, a missing file or folder is reported."""
        records = super().read(split, policy, parsed)
        if not self.check_files:
            return records
        kept = []
        for record in records:
            path = getattr(record.image, "path", "")
            if os.path.exists(path):
                kept.append(record)
            else:
                policy.fail(
                    "missing_video",
                    f"{record.describe()}: video file or frame folder not found: {path} (relative paths are "
                    "resolved against video_root, or the annotation file's folder)",
                )
        return kept


class _RowGrouper:
    """Groups rows (one item-caption pair, or one item with a caption list) into records per item."""

    def __init__(self, table: Table, policy: ErrorPolicy) -> None:
        self.table = table
        self.policy = policy
        self.records: dict[str, ImageCaptionRecord] = {}
        self.paths: dict[str, str] = {}

    def add(self, where: str, image: Any, captions: list[Any], group: Any, split: Any, label: Any) -> None:
        item = self.table.item_name
        if not isinstance(image, str) or not image.strip():
            self.policy.fail("bad_value", f"{where}: {item} path must be a non-empty string, got {image!r}")
            return
        path = self.table.resolve(image.strip())
        key = string_value(group) if group is not None else image.strip()
        if key is None:
            self.policy.fail(
                "bad_value", f"{where}: {item} id must be a non-empty string or int, got {group!r}"
            )
            return
        split_name = string_value(split)
        if split_name is None:
            self.policy.fail("bad_value", f"{where}: split must be a non-empty string, got {split!r}")
            return
        label_name = string_value(label)
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
                image_id=key,
                image=self.table.visual(path),
                captions=kept,
                split=split_name,
                label=label_name,
                origin=where,
            )
            self.paths[key] = path
            return
        if self.paths[key] != path:
            self.policy.fail(
                "duplicate_image_id",
                f"{where}: duplicate {item} id {key!r} with a different {item} ({image.strip()!r}); "
                f"{record.origin} has {self.paths[key]!r}",
            )
        elif record.split != split_name or record.label != label_name:
            self.policy.fail(
                "conflicting_values",
                f"{where}: {item} {key!r} has split {split_name!r} and label {label_name!r}, but "
                f"{record.origin} gave split {record.split!r} and label {record.label!r}",
            )
        else:
            record.captions.extend(kept)


def _first_row(line: str, separator: str) -> list[str]:
    return next(csv.reader([line], delimiter=separator), [])


def _header_hint(header_line: str, separator: str) -> str:
    for other, name in _SEPARATOR_NAMES.items():
        if other != separator and other in header_line:
            return (
                f"; the header contains {name}, so the file looks {name[:-1]}-separated but separator="
                f"{separator!r} was used: pass separator={other!r}"
            )
    return ""
