"""The record every source emits, its validation, and the error policy for bad input.

Every source (:mod:`pefttune.data.sources`) produces :class:`ImageCaptionRecord` objects: one per visual item
(an image or a :class:`~pefttune.data.video.Video`), holding all of its captions. Training explodes or samples
the captions; evaluation uses the grouped form (all captions, or one per item under the ``"one"`` caption
protocol), so the "one caption or five?" question is settled in one place.

Bad input is handled by an :class:`ErrorPolicy`. With ``on_error="raise"`` (the default) the first problem
raises a :class:`DataFormatError` naming the file, the record (index and image id) and what was expected.
With ``on_error="skip"`` the bad caption or record is dropped, counted by reason and listed in a
:class:`SkipReport`, which is logged at WARNING. Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol, Union, runtime_checkable

from PIL import Image

if TYPE_CHECKING:
    from pefttune.data.video import Video

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

# A path, the encoded bytes of an image file, or a zero-argument callable returning a PIL image (the synthetic
# dataset renders on the fly; WebDataset evaluation reads a tar member lazily) -- or, for video, a `Video`
# (pefttune.data.video): frames are sampled from it when the item is loaded.
ImageSource = Union[str, os.PathLike, bytes, Callable[[], Image.Image], "Video"]


@runtime_checkable
class EncodedImage(Protocol):
    """A lazily read encoded image file (a tar member): calling it opens the image, ``read`` gives bytes."""

    def read(self) -> bytes:
        """The encoded file's bytes, as stored."""
        ...

    def __call__(self) -> Image.Image:
        """The image, opened from those bytes."""
        ...


def image_content_hash(data: bytes) -> int:
    """The value of the batch key ``image_hashes`` for an image file's raw bytes.

    The first 8 bytes of BLAKE2b over the file's bytes (before decoding), as a signed 64-bit integer (fits
    ``torch.int64``). Equal bytes give equal values in every process and every run (unlike Python's
    ``hash``), so ids compare correctly across DDP ranks; distinct files collide with probability about
    ``n^2 / 2^65``.

    Args:
        data: the encoded image file (JPEG, PNG, ...), exactly as stored.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class DataError(ValueError):
    """Base class of the data pipeline's input errors."""


class DataFormatError(DataError):
    """An annotation file or record does not have the expected layout or content."""


class ImageLoadError(DataError):
    """An image cannot be opened or decoded."""


class VideoLoadError(ImageLoadError):
    """A video (file or frame folder) cannot be opened, has no frames or a frame cannot be decoded."""


# Reasons under which records or captions are skipped. Keys are stable (tests and logs use them); values say
# what was dropped.
SKIP_REASONS: dict[str, str] = {
    "empty_caption": "caption dropped: empty or whitespace-only",
    "bad_caption": "caption dropped: missing or not a string",
    "no_captions": "record dropped: no usable caption",
    "missing_key": "record dropped: a required key or column is missing",
    "bad_value": "record dropped: a value has the wrong type or is empty",
    "duplicate_image_id": "record dropped: its image id was already used by an earlier record",
    "conflicting_values": "row dropped: disagrees with earlier rows of the same image",
    "unknown_image_id": "caption dropped: refers to an image id that is not listed",
    "missing_image": "record dropped: image file not found",
    "unreadable_image": "record dropped: image cannot be opened or decoded",
    "missing_video": "record dropped: video file or frame folder not found",
    "unreadable_video": "record dropped: video cannot be opened or decoded, or has no frames",
    "unknown_video_id": "caption dropped: refers to a video id that is not listed",
    "bad_sample": "sample dropped: malformed WebDataset sample",
    "duplicate_image_file": "record dropped: its image file is already used by another id in the split",
}


@dataclass
class ImageCaptionRecord:
    """One visual item (an image or a video) with all of its captions.

    The names say "image" for history; a video record is the same record whose ``image`` is a
    :class:`~pefttune.data.video.Video` (see :attr:`is_video`), and ``image_id`` is the video id.

    Attributes:
        image_id: Identifier of the item, unique within a dataset (all splits).
        image: Where the pixels come from: a file path, the encoded bytes of an image file, a zero-argument
            callable returning a PIL image, or a :class:`~pefttune.data.video.Video`.
        captions: The captions of the item, at least one, none empty.
        split: Name of the split the item belongs to (``"train"``, ``"val"``, ``"test"``, ...).
        label: Class name of the item (for zero-shot classification), or None.
        origin: Where the record was read from, e.g. ``"captions.json, images[12]"``; used in error messages.
        eval_caption: Index into ``captions`` of the caption evaluated under the one-caption-per-item protocol
            (``eval_captions="one"``): the split file's sentence for MSR-VTT 1k-A, else the first caption.
    """

    image_id: str
    image: ImageSource
    captions: list[str]
    split: str
    label: str | None = None
    origin: str | None = None
    eval_caption: int = 0

    @property
    def is_video(self) -> bool:
        """Whether the item is a video (its ``image`` is a :class:`~pefttune.data.video.Video`)."""
        from pefttune.data.video import Video

        return isinstance(self.image, Video)

    def describe(self) -> str:
        """Name the record for error messages: origin and image id."""
        where = self.origin if self.origin is not None else "record"
        return f"{where} (image id {self.image_id!r})"


def normalize_caption(caption: str) -> str:
    """Return the form under which two captions count as the same text: lower case, whitespace collapsed."""
    return " ".join(caption.lower().split())


@dataclass
class SkipReport:
    """Counts and examples of everything skipped under ``on_error="skip"``.

    Attributes:
        counts: Number of skipped items per reason (see :data:`SKIP_REASONS`).
        examples: The first ``max_examples`` messages per reason.
        max_examples: How many messages to keep per reason.
    """

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def total(self) -> int:
        """Number of skipped items, all reasons together."""
        return sum(self.counts.values())

    def add(self, reason: str, message: str) -> None:
        """Count one skipped item and keep its message if fewer than ``max_examples`` are kept."""
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(message)

    def merge(self, other: SkipReport) -> None:
        """Add the counts and examples of another report to this one."""
        for reason, count in other.counts.items():
            self.counts[reason] += count
            kept = self.examples.setdefault(reason, [])
            room = self.max_examples - len(kept)
            kept.extend(other.examples.get(reason, [])[: max(room, 0)])

    def summary(self) -> str:
        """Human-readable summary: counts per reason, each followed by its first examples."""
        if not self.total:
            return "nothing skipped"
        lines = [f"skipped {self.total} item(s):"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason} ({SKIP_REASONS.get(reason, reason)}): {count}")
            lines.extend(f"    - {message}" for message in self.examples.get(reason, []))
            if count > len(self.examples.get(reason, [])):
                lines.append(f"    ... and {count - len(self.examples.get(reason, []))} more")
        return "\n".join(lines)

    def log(self, log: logging.Logger | None = None, context: str = "") -> None:
        """Log the summary at WARNING, if anything was skipped."""
        if self.total:
            prefix = f"{context}: " if context else ""
            (log or logger).warning("%s%s", prefix, self.summary())


class ErrorPolicy:
    """Applies ``on_error`` to each problem found while reading or validating input.

    Args:
        on_error: ``"raise"`` to stop at the first problem, ``"skip"`` to count and drop.
        report: Where skipped items are recorded; a new report is made when None.
    """

    def __init__(self, on_error: OnError = "raise", report: SkipReport | None = None) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.report = report if report is not None else SkipReport()
        self.report_total_at_start = (
            self.report.total
        )  # a shared report may already hold other sources' skips

    @property
    def skipping(self) -> bool:
        """Whether problems are skipped rather than raised."""
        return self.on_error == "skip"

    def fail(self, reason: str, message: str, error: type[DataError] = DataFormatError) -> None:
        """Raise ``error(message)``, or with ``on_error="skip"`` record the problem and return.

        Args:
            reason: Key of :data:`SKIP_REASONS`.
            message: Says which file and record, and what was expected.
            error: Exception class to raise.

        Raises:
            DataError: With ``on_error="raise"``.
        """
        if not self.skipping:
            raise error(message)
        self.report.add(reason, message)


def validate_records(
    records: Iterable[ImageCaptionRecord],
    *,
    source: str,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    check_files: bool = True,
) -> list[ImageCaptionRecord]:
    """Check records and return the usable ones.

    Checks, in order: a non-empty string image id and split; captions that are strings and not empty or
    whitespace-only (surrounding whitespace is stripped); at least one caption left; image ids unique across
    the whole input (the first occurrence wins under ``"skip"``); and, with ``check_files``, that image paths
    exist. Images themselves are not decoded here (see ``validate_images`` in the data module).

    Args:
        records: Records as read from one source.
        source: Name of the source (file path or pattern) used in messages.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped items under ``"skip"``.
        check_files: Whether to check that image paths exist (a cheap ``stat`` per image).

    Returns:
        The valid records, with captions stripped, in input order.

    Raises:
        DataFormatError: With ``on_error="raise"``, at the first problem.
    """
    policy = ErrorPolicy(on_error, report)
    seen: dict[str, str] = {}
    valid: list[ImageCaptionRecord] = []
    for index, record in enumerate(records):
        where = record.origin if record.origin is not None else f"{source}, record {index}"
        if not isinstance(record.image_id, str) or not record.image_id.strip():
            policy.fail("bad_value", f"{where}: image id must be a non-empty string, got {record.image_id!r}")
            continue
        name = f"{where} (image id {record.image_id!r})"
        if not isinstance(record.split, str) or not record.split.strip():
            policy.fail("bad_value", f"{name}: split must be a non-empty string, got {record.split!r}")
            continue
        kept_positions = _clean_captions(record.captions, name, policy)
        captions = [record.captions[position].strip() for position in kept_positions]
        if not captions:
            policy.fail("no_captions", f"{name}: no usable caption (expected at least one non-empty caption)")
            continue
        if record.image_id in seen:
            policy.fail(
                "duplicate_image_id",
                f"{name}: duplicate image id {record.image_id!r}, already used by {seen[record.image_id]}",
            )
            continue
        if check_files and isinstance(record.image, (str, os.PathLike)) and not os.path.isfile(record.image):
            policy.fail(
                "missing_image",
                f"{name}: image file not found: {os.fspath(record.image)} "
                "(relative paths are resolved against image_root, or the annotation file's folder)",
            )
            continue
        seen[record.image_id] = where
        # The one-caption protocol's caption keeps pointing at the same sentence after empty ones are dropped.
        kept_eval = record.eval_caption in kept_positions
        eval_caption = kept_positions.index(record.eval_caption) if kept_eval else 0
        valid.append(replace(record, captions=captions, eval_caption=eval_caption))
    return valid


def _clean_captions(captions: object, name: str, policy: ErrorPolicy) -> list[int]:
    """Positions of the usable captions (strings, not empty); the others are reported through ``policy``."""
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        policy.fail("bad_value", f"{name}: captions must be a list of strings, got {type(captions).__name__}")
        return []
    kept = []
    for position, caption in enumerate(captions):
        if not isinstance(caption, str):
            policy.fail("bad_caption", f"{name}: caption {position} must be a string, got {caption!r}")
        elif not caption.strip():
            policy.fail("empty_caption", f"{name}: caption {position} is empty or whitespace-only")
        else:
            kept.append(position)
    return kept


def check_duplicate_files(
    records: list[ImageCaptionRecord], *, source: str, refuse: bool, policy: ErrorPolicy
) -> list[ImageCaptionRecord]:
    """Find the same image file (or video path) listed under several ids in one split.

    Duplicates inflate or deflate retrieval scores: a query whose true item has a twin under another id is
    scored wrong when it finds the twin. In a training split they are only logged (a warning with the
    count); in an evaluation split (``refuse=True``) they raise, or under ``on_error="skip"`` every later
    id of the same file is dropped and counted as ``"duplicate_image_file"``.

    Only file paths are compared (bytes, callables and in-memory frames have no identity to compare).

    Args:
        records: The records of one split.
        source: Name of the source, for messages.
        refuse: Whether duplicates are an error (evaluation splits).
        policy: The error policy.

    Returns:
        The records (without the later duplicates when they were skipped).

    Raises:
        DataFormatError: With ``refuse`` and ``on_error="raise"``, naming the first duplicate and the count.
    """
    first: dict[str, ImageCaptionRecord] = {}
    duplicates: list[tuple[ImageCaptionRecord, ImageCaptionRecord]] = []
    for record in records:
        path = getattr(record.image, "path", record.image)  # a Video on disk has a path
        if not isinstance(path, (str, os.PathLike)):
            continue
        key = os.path.normcase(os.path.abspath(os.fspath(path)))
        if key in first:
            duplicates.append((record, first[key]))
        else:
            first[key] = record
    if not duplicates:
        return records
    record, original = duplicates[0]
    summary = (
        f"{source}: {len(duplicates)} record(s) of split {record.split!r} reuse a file already listed under "
        f"another id, e.g. {record.describe()} and {original.describe()} share "
        f"{os.fspath(getattr(record.image, 'path', record.image))}"
    )
    if not refuse:
        logger.warning("%s; retrieval counts them as different items", summary)
        return records
    if not policy.skipping:
        raise DataFormatError(
            summary + "; an evaluation split must list each file once (duplicates make a correct retrieval "
            "count as wrong); remove them or set on_error='skip' to drop the later ids"
        )
    dropped = {id(dup) for dup, _ in duplicates}
    for dup, orig in duplicates:
        policy.fail("duplicate_image_file", f"{dup.describe()}: same file as {orig.describe()}")
    return [record for record in records if id(record) not in dropped]


def select_split(records: list[ImageCaptionRecord], split: str, *, source: str) -> list[ImageCaptionRecord]:
    """Return the records of one split.

    Args:
        records: Records of all splits.
        split: Name of the wanted split.
        source: Name of the source, for the error message.

    Returns:
        The records whose ``split`` is ``split``, in input order.

    Raises:
        DataFormatError: If the split has no images; the message lists the available splits and their sizes.
    """
    chosen = [record for record in records if record.split == split]
    if not chosen:
        sizes = Counter(record.split for record in records)
        available = ", ".join(f"{name!r} ({count} images)" for name, count in sorted(sizes.items())) or "none"
        raise DataFormatError(f"{source}: split {split!r} has no images; available splits: {available}")
    return chosen
