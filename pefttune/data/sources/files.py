"""What file-based sources share: reading text and JSON with clear errors, resolving image paths.

:class:`FileSource` is the base of the sources that read one annotation file (Karpathy, COCO, tables,
MSR-VTT): a ``path``, an ``image_root`` relative image paths are resolved against (default: the file's folder)
and ``check_files``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pefttune.data.records import DataFormatError
from pefttune.data.sources.base import Source


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


def string_value(value: Any) -> str | None:
    """Return ids and labels as strings (JSON ids are often ints); None for missing or unusable values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)):
        text = str(value).strip()
        return text or None
    return None


class FileSource(Source):
    """A source read from one annotation file.

    Args:
        path: The annotation file.
        image_root: Folder relative image (or video) paths are resolved against; None means the file's folder.
        check_files: Check at setup that image files exist (one ``stat`` per image).
    """

    def __init__(self, path: str, image_root: str | None = None, check_files: bool = True) -> None:
        if not isinstance(path, str) or not path:
            raise ValueError(f"{type(self).__name__}: path must be a non-empty string, got {path!r}")
        self.path = path
        self.image_root = image_root
        self.check_files = check_files

    @property
    def base_dir(self) -> str:
        """The annotation file's folder."""
        return os.path.dirname(os.path.abspath(self.path))

    def resolve(self, path: str) -> str:
        """Resolve a path written in the annotation file (see :func:`resolve_image_path`)."""
        return resolve_image_path(path, self.image_root, self.base_dir)

    def describe(self) -> str:
        """The annotation file's path."""
        return self.path
