"""Datasets over records, image and frame loading, and the collate functions that build the batch layouts.

- :class:`PairDataset` (training): one item per image-caption pair (``captions_per_image="all"``), or one item
  per image with a caption drawn afresh each epoch (``"sample"``, seeded; call :meth:`PairDataset.set_epoch`).
- :class:`ImageWithCaptionsDataset` (evaluation): each image once, with all of its captions (or the one
  caption of the one-caption protocol, ``eval_captions="one"``).
- :class:`ItemLoader`: loads a record's image, or samples and loads a video's frames
  (:mod:`pefttune.data.video`), and applies the transform (the same random augmentation to every frame of a
  clip).
- :class:`TrainCollate` / :class:`EvalCollate`: tokenize with the attached
  :class:`~pefttune.data.preprocessing.Preprocessing` and build the batches documented there.
- :class:`EpochDataLoader`: tells the dataset the epoch, reseeds the shuffle and resumes mid-epoch.

Ids (all ``torch.long``). For map-style datasets: ``image_ids`` are record positions in the dataset,
``caption_ids`` number all captions of the dataset (image-major), and ``text_ids`` number the distinct
*normalised* caption strings (lower case, whitespace collapsed) in order of first appearance. They are
functions of the index only, so the duplicates a ``DistributedSampler`` pads with carry the same ids as the
originals and metrics can drop them by id. Streams (:mod:`pefttune.data.sources.webdataset`) cannot number
globally: their ids are stable 63-bit hashes (:func:`stable_id`) of the key, of ``(key, caption position)``
and of the normalised caption.

Images are converted to RGB by :func:`to_rgb` (EXIF orientation applied; transparency composited on white;
16-bit grey scaled to 8 bits). A missing, empty or undecodable image (or video) raises
:class:`ImageLoadError` naming the file and the record, whatever ``on_error`` is: a map-style dataset cannot
drop an item mid-epoch without changing the number of batches per rank under DDP or silently substituting
another sample. To skip bad images instead, check them up front with :func:`check_images` (the data module's
``validate_images=True``), which decodes every image (a video: its frame count and first frame) once and,
under ``on_error="skip"``, drops and reports the unreadable ones. Streams skip (and count) undecodable
samples under ``on_error="skip"``, since a stream has no fixed index to keep.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pefttune.data.cache import SharedIdSet
from pefttune.data.epoch import SharedEpoch
from pefttune.data.preprocessing import ImageTransform, Tokenize
from pefttune.data.records import (
    DataFormatError,
    EncodedImage,
    ErrorPolicy,
    ImageCaptionRecord,
    ImageLoadError,
    ImageSource,
    OnError,
    SkipReport,
    image_content_hash,
    normalize_caption,
)
from pefttune.data.video import FrameSampler, Video

logger = logging.getLogger(__name__)

CaptionsPerImage = Literal["all", "sample"]
EvalCaptions = Literal["all", "one"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# ---------------------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, upright.

    - EXIF orientation is applied.
    - Transparency (RGBA, LA, PA, palette or grey with a transparency key) is composited onto white, the
      background such images are usually shown on; a plain ``convert("RGB")`` would expose whatever colour the
      transparent pixels happen to hold (often black).
    - 16-bit grey (``I;16*``) is scaled by 255/65535 instead of being clipped, which would turn it white.
      32-bit integer (``I``) and float (``F``) images are taken as 8-bit if their maximum is at most 255 (or
      as [0, 1] floats if at most 1), as 16-bit if at most 65535, and otherwise scaled by their range.
    - Everything else (L, P, 1, CMYK, YCbCr, LAB, HSV) goes through PIL's ``convert("RGB")``.

    Args:
        image: A loaded PIL image.

    Returns:
        An RGB image.
    """
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    values = array.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = values * (255.0 / 65535.0)
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = values
        elif low >= 0.0 and high <= 65535.0:
            scaled = values * (255.0 / 65535.0)
        else:
            scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image(source: ImageSource, *, record: str = "image") -> Image.Image:
    """Load an image as RGB (see :func:`to_rgb`), fully decoded.

    Args:
        source: A path, encoded bytes, or a zero-argument callable returning a PIL image.
        record: Names the record in error messages (file, index and image id).

    Returns:
        The decoded RGB image.

    Raises:
        ImageLoadError: If the file is missing or empty, or the image cannot be decoded (truncated or corrupt
            data, unknown format); the message names the file and the record.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageLoadError(f"image file not found: {path} ({record})")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"image file is empty (0 bytes): {path} ({record})")
        name = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"image bytes are empty ({record})")
        name = "image bytes"
    elif hasattr(source, "shard") and hasattr(source, "member"):  # a lazy tar member
        name = f"{source.shard} member {source.member!r}"
    elif callable(source):
        name = "image callable"
    else:
        raise ImageLoadError(f"unsupported image source {type(source).__name__} ({record})")
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(path, "rb") as handle:
                image = Image.open(handle)
                image.load()
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
            image.load()
        else:
            image = source()
            if not isinstance(image, Image.Image):
                raise ImageLoadError(
                    f"the image callable returned {type(image).__name__}, expected a PIL image"
                )
            image.load()
        return to_rgb(image)
    except ImageLoadError as err:
        raise ImageLoadError(f"cannot load image {name}: {err} ({record})") from err
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ImageLoadError(
            f"cannot load image {name}: {type(err).__name__}: {err} ({record}); the file may be truncated, "
            "corrupt or not an image"
        ) from err


def encoded_image_bytes(source: ImageSource | Video, *, record: str = "image") -> bytes:
    """The bytes that identify an image's content: the file as stored (before decoding).

    A file path is read; encoded bytes are themselves; a lazy tar member gives its bytes; a rendered image
    (a callable, such as the synthetic scenes) gives its mode, size and pixels.

    Args:
        source: The record's image source.
        record: Names the record in error messages.

    Raises:
        DataFormatError: For a video, which has no single file content to compare.
        ImageLoadError: If the file cannot be read.
    """
    if isinstance(source, Video):
        raise DataFormatError(
            f"image content identity (image_identity='content') needs image files, but {record} is a video "
            f"({source.describe()}); use image_identity='id' for video data"
        )
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise ImageLoadError(f"cannot read image file {os.fspath(source)}: {err} ({record})") from err
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, EncodedImage):
        return source.read()
    image = load_image(source, record=record)
    return f"{image.mode}:{image.size}:".encode() + image.tobytes()


def check_images(
    records: Sequence[ImageCaptionRecord],
    *,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    num_threads: int | None = None,
) -> list[ImageCaptionRecord]:
    """Decode every record's image once and keep the records whose image loads.

    Meant for set-up time (``validate_images=True``): it costs one full decode per image, run on a thread pool
    (PIL releases the GIL while decoding).

    Args:
        records: Records to check.
        on_error: ``"raise"`` raises for the first unreadable image (in record order); ``"skip"`` drops the
            unreadable ones and reports them as ``"unreadable_image"``.
        report: Collects skipped records.
        num_threads: Size of the thread pool; None uses up to 8 threads.

    Returns:
        The records whose image loads, in order.

    Raises:
        ImageLoadError: Under ``on_error="raise"``.
    """

    def attempt(record: ImageCaptionRecord) -> ImageLoadError | None:
        try:
            if isinstance(record.image, Video):
                # A video is usable when it has a frame and its first frame decodes.
                if record.image.num_frames() < 1:
                    raise ImageLoadError(f"{record.image.describe()}: no frames ({record.describe()})")
                record.image.read_frames([0])
            else:
                load_image(record.image, record=record.describe())
        except ImageLoadError as err:
            return type(err)(f"{err} ({record.describe()})") if isinstance(record.image, Video) else err
        return None

    threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        errors = list(pool.map(attempt, records))
    policy = ErrorPolicy(on_error, report)
    kept = []
    for record, error in zip(records, errors, strict=True):
        if error is None:
            kept.append(record)
        else:
            video = isinstance(record.image, Video)
            policy.fail("unreadable_video" if video else "unreadable_image", str(error), type(error))
    return kept


# ---------------------------------------------------------------------------------------------------------
# Ids


def stable_id(text: str) -> int:
    """A 63-bit non-negative id of a string, the same in every process and run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class CaptionIndex:
    """Integer ids for a list of records (see the module docstring).

    Args:
        records: The records of one dataset (one split).

    Attributes:
        records: The records.
        caption_offsets: ``caption_offsets[i]`` is the caption id of record ``i``'s first caption.
        text_ids: ``text_ids[i][j]`` is the text id of record ``i``'s caption ``j``.
        num_texts: Number of distinct normalised captions.
    """

    def __init__(self, records: Sequence[ImageCaptionRecord]) -> None:
        self.records = list(records)
        counts = np.array([len(record.captions) for record in self.records], dtype=np.int64)
        if (counts == 0).any():
            first = self.records[int(np.argmax(counts == 0))]
            raise DataFormatError(f"{first.describe()}: record has no captions")
        self.caption_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.num_captions = int(counts.sum())
        vocabulary: dict[str, int] = {}
        self.text_ids = [
            [
                vocabulary.setdefault(normalize_caption(caption), len(vocabulary))
                for caption in record.captions
            ]
            for record in self.records
        ]
        self.num_texts = len(vocabulary)
        # Pair p is caption pair_caption[p] of record pair_record[p], image-major.
        self.pair_record = np.repeat(np.arange(len(self.records), dtype=np.int64), counts)
        self.pair_caption = (
            np.arange(self.num_captions, dtype=np.int64) - self.caption_offsets[self.pair_record]
        )


# ---------------------------------------------------------------------------------------------------------
# Loading an item's pixels


def _same_augmentation(
    transform: ImageTransform, frames: Sequence[Image.Image], seed: int
) -> list[torch.Tensor]:
    """Apply a (random) transform to every frame of a clip with the same random draws.

    Transforms draw from torch's and Python's global generators (torchvision, timm); both are reseeded with
    the clip's ``seed`` before each frame, and restored afterwards, so the clip gets one crop, one flip, ...
    and the global generators are left as they were.
    """
    python_state = random.getstate()
    outputs = []
    try:
        with torch.random.fork_rng(devices=[]):
            for frame in frames:
                torch.manual_seed(seed)
                random.seed(seed)
                outputs.append(transform(frame))
    finally:
        random.setstate(python_state)
    return outputs


class ItemLoader:
    """Loads a record's pixels and applies the transform: an image, or a video's sampled frames.

    Image records give ``{"image": tensor [3, H, W]}``. Video records give ``{"image": [T, 3, H, W],
    "frame_mask": [T] bool, "frame_indices": [T] long}``: ``T = sampler.num_frames`` frames chosen by the
    :class:`~pefttune.data.video.FrameSampler` (random offsets when an ``rng`` is given, segment centres
    otherwise), one random augmentation for the whole clip, and zero padding (mask False, index -1) after the
    frames of a clip shorter than ``T``.

    Args:
        transform: Image transform (PIL -> tensor), or None to return PIL images (tests, inspection).
        sampler: Frame sampler for video records.
    """

    def __init__(
        self,
        transform: ImageTransform | None,
        sampler: FrameSampler | None = None,
        content_hashes: bool = False,
    ) -> None:
        self.transform = transform
        self.sampler = sampler if sampler is not None else FrameSampler()
        # Items then carry ``image_hash`` (the file's content hash), memoised per image id: a file is read
        # for it once per process, not once per epoch.
        self.content_hashes = content_hashes
        self._hashes: dict[str, int] = {}
        # A decoded-image cache (pefttune.data.cache, set by the data module): ``load(source, decode)`` gives
        # the transformed image, decoding with ``decode()`` only on a miss. Images only (not video frames).
        self.image_cache: Any = None

    def __call__(self, record: ImageCaptionRecord, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Load and transform; ``rng`` draws the training frame offsets (None: evaluation)."""
        item = self._load(record, rng)
        if self.content_hashes:
            if record.image_id not in self._hashes:
                self._hashes[record.image_id] = image_content_hash(
                    encoded_image_bytes(record.image, record=record.describe())
                )
            item["image_hash"] = self._hashes[record.image_id]
        return item

    def _load(self, record: ImageCaptionRecord, rng: np.random.Generator | None) -> dict[str, Any]:
        if not isinstance(record.image, Video):
            if self.image_cache is not None:
                decode = lambda: load_image(record.image, record=record.describe())  # noqa: E731
                return {"image": self.image_cache.load(record.image, decode)}
            image = load_image(record.image, record=record.describe())
            return {"image": self.transform(image) if self.transform is not None else image}
        try:
            sampled = self.sampler.sample(record.image, rng=rng)
        except ImageLoadError as err:
            raise type(err)(f"{err} ({record.describe()})") from err
        frames: list[Any] = list(sampled.frames)
        if self.transform is not None:
            # The clip's augmentation comes from the item's own generator, like its frame offsets, not from
            # the global one: a clip is augmented the same whatever ran before it (a validation, a resume,
            # another loader worker), so a resumed run is exact and workers do not change the data.
            seed = int(rng.integers(2**62)) if rng is not None else 0
            frames = _same_augmentation(self.transform, sampled.frames, seed)
        slots, count = sampled.num_slots, len(frames)
        mask = torch.zeros(slots, dtype=torch.bool)
        mask[:count] = True
        indices = torch.full((slots,), -1, dtype=torch.long)
        indices[:count] = torch.tensor(sampled.indices, dtype=torch.long)
        if self.transform is not None:
            stacked = torch.stack(frames)
            if count < slots:
                padding = stacked.new_zeros((slots - count, *stacked.shape[1:]))
                stacked = torch.cat([stacked, padding])
            return {"image": stacked, "frame_mask": mask, "frame_indices": indices}
        return {"image": frames, "frame_mask": mask, "frame_indices": indices}


# ---------------------------------------------------------------------------------------------------------
# Map-style datasets


class _RecordDataset(Dataset):
    def __init__(self, records: Sequence[ImageCaptionRecord], loader: ItemLoader) -> None:
        self.index = CaptionIndex(records)
        self.loader = loader

    @property
    def records(self) -> list[ImageCaptionRecord]:
        """The records the dataset serves."""
        return self.index.records

    @property
    def image_cache(self) -> Any:
        """The loader's decoded-image cache (see :class:`ItemLoader`), or None."""
        return self.loader.image_cache

    @image_cache.setter
    def image_cache(self, cache: Any) -> None:
        self.loader.image_cache = cache


class PairDataset(SharedEpoch, _RecordDataset):
    """Training pairs from records.

    Items are dicts: ``image`` (the transformed tensor, or the PIL image when the transform is None; for
    video [T, 3, H, W] plus ``frame_mask`` and ``frame_indices``), ``caption`` (str), ``image_id``,
    ``caption_id``, ``text_id`` (ints, see the module docstring).

    Args:
        records: The records of the training split.
        captions_per_image: ``"all"``: one item per caption (image-major order). ``"sample"``: one item per
            image, its caption drawn from ``(seed, epoch, index)``, so it changes with :meth:`set_epoch` and
            is reproducible.
        transform: Image transform (the preprocessing's ``train_transform``), applied in ``__getitem__``.
        seed: Seed of the caption draw and of the frame offsets.
        max_items: Keep only the first ``max_items`` items (quick runs).
        sampler: Frame sampler for video records.
        content_hashes: Items also carry ``image_hash``, the content hash of the image file.
    """

    def __init__(
        self,
        records: Sequence[ImageCaptionRecord],
        *,
        captions_per_image: CaptionsPerImage = "all",
        transform: ImageTransform | None = None,
        seed: int = 0,
        max_items: int | None = None,
        sampler: FrameSampler | None = None,
        content_hashes: bool = False,
    ) -> None:
        if captions_per_image not in ("all", "sample"):
            raise ValueError(f"captions_per_image must be 'all' or 'sample', got {captions_per_image!r}")
        super().__init__(records, ItemLoader(transform, sampler, content_hashes))
        self.captions_per_image = captions_per_image
        self.seed = seed
        full = self.index.num_captions if captions_per_image == "all" else len(self.index.records)
        self._length = full if max_items is None else max(0, min(full, max_items))
        self._init_shared_epoch()  # the caption draw's epoch, seen by persistent workers too
        # Set by a model that caches a locked tower's image features (pefttune.data.cache.SkipsCachedImages).
        self.skip_images: SharedIdSet | None = None
        self._skipped_image: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        """One more than the largest image id (ids are record positions)."""
        return len(self.index.records)

    def _is_skipped(self, record_index: int, record: ImageCaptionRecord) -> bool:
        return (
            self.skip_images is not None
            and self.loader.transform is not None
            and not isinstance(record.image, Video)
            and record_index in self.skip_images
        )

    def _skipped_item(self) -> dict[str, Any]:
        """What a skipped image yields: NaN pixels in the transform's output shape."""
        if self._skipped_image is None:
            # The (deterministic) transform's output shape, from a blank image; NaN, so that it cannot pass
            # for an image if it ever reached a tower (the model checks).
            shape = self.loader.transform(Image.new("RGB", (8, 8))).shape
            self._skipped_image = torch.full(tuple(shape), float("nan"))
        return {"image": self._skipped_image}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} items")
        if self.captions_per_image == "all":
            record_index = int(self.index.pair_record[index])
            position = int(self.index.pair_caption[index])
        else:
            record_index = index
            count = len(self.index.records[index].captions)
            position = int(np.random.default_rng([self.seed, self.epoch, index]).integers(count))
        record = self.index.records[record_index]
        frame_rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        skipped = self._is_skipped(record_index, record)
        loaded = self._skipped_item() if skipped else self.loader(record, frame_rng)
        return loaded | {
            "caption": record.captions[position],
            "image_id": record_index,
            "caption_id": int(self.index.caption_offsets[record_index]) + position,
            "text_id": self.index.text_ids[record_index][position],
        }


class ImageWithCaptionsDataset(_RecordDataset):
    """Evaluation items: every image (or video) once, with its captions.

    Items are dicts: ``image`` (and for video ``frame_mask``, ``frame_indices``), ``captions`` (list of str),
    ``image_id`` (int), ``caption_ids`` and ``text_ids`` (lists of int, one per caption).

    Args:
        records: The records of an evaluation split.
        transform: Image transform (the preprocessing's ``eval_transform``).
        eval_captions: ``"all"``: every caption of each item. ``"one"``: only the record's ``eval_caption``
            (MSR-VTT 1k-A: the split file's sentence; else the first caption). Caption ids stay those of
            the full caption list, so they are comparable between protocols.
        sampler: Frame sampler for video records (segment centres: deterministic).
    """

    def __init__(
        self,
        records: Sequence[ImageCaptionRecord],
        *,
        transform: ImageTransform | None = None,
        eval_captions: EvalCaptions = "all",
        sampler: FrameSampler | None = None,
    ) -> None:
        if eval_captions not in ("all", "one"):
            raise ValueError(f"eval_captions must be 'all' or 'one', got {eval_captions!r}")
        super().__init__(records, ItemLoader(transform, sampler))
        self.eval_captions = eval_captions

    def __len__(self) -> int:
        return len(self.index.records)

    def positions(self, index: int) -> list[int]:
        """Positions of the evaluated captions of record ``index``."""
        record = self.index.records[index]
        return [record.eval_caption] if self.eval_captions == "one" else list(range(len(record.captions)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.index.records[index]
        first = int(self.index.caption_offsets[index])
        positions = self.positions(index)
        return self.loader(record) | {
            "captions": [record.captions[p] for p in positions],
            "image_id": index,
            "caption_ids": [first + p for p in positions],
            "text_ids": [self.index.text_ids[index][p] for p in positions],
        }


def evaluation_captions(records: Sequence[ImageCaptionRecord], eval_captions: EvalCaptions) -> list[str]:
    """The captions an evaluation loader yields, in order (see :class:`ImageWithCaptionsDataset`)."""
    if eval_captions == "one":
        return [record.captions[record.eval_caption] for record in records]
    return [caption for record in records for caption in record.captions]


# ---------------------------------------------------------------------------------------------------------
# Collation and loading


def _stack_images(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``pixel_values`` [B, 3, H, W] (video: [B, T, 3, H, W] with ``frame_mask`` and ``frame_indices``)."""
    images = [item["image"] for item in items]
    if not all(isinstance(image, torch.Tensor) for image in images):
        raise TypeError(
            "the image transform must return tensors [3, H, W]; got "
            f"{type(images[0]).__name__} (was a Preprocessing attached to the dataset?)"
        )
    videos = ["frame_mask" in item for item in items]
    if any(videos) and not all(videos):
        raise DataFormatError("a batch mixes images and videos; a data set must hold one or the other")
    batch = {"pixel_values": torch.stack(images)}
    if all(videos):
        batch["frame_mask"] = torch.stack([item["frame_mask"] for item in items])
        batch["frame_indices"] = torch.stack([item["frame_indices"] for item in items])
    return batch


def _tokenize(tokenize: Tokenize, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenize(captions)
    for key in ("input_ids", "attention_mask"):
        if key not in tokens:
            raise KeyError(f"tokenize must return 'input_ids' and 'attention_mask'; got keys {list(tokens)}")
    return torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"])


def _ids(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


class TrainCollate:
    """Build the training batch of :mod:`pefttune.data.preprocessing` from :class:`PairDataset` items.

    Args:
        tokenize: The preprocessing's ``tokenize`` (pads to the longest caption, truncates to the maximum).
    """

    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack images, tokenize captions and gather ids."""
        input_ids, attention_mask = _tokenize(self.tokenize, [item["caption"] for item in items])
        batch = _stack_images(items) | {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_ids": _ids([item["image_id"] for item in items]),
            "caption_ids": _ids([item["caption_id"] for item in items]),
            "text_ids": _ids([item["text_id"] for item in items]),
        }
        if "image_hash" in items[0]:
            batch["image_hashes"] = _ids([item["image_hash"] for item in items])
        return batch


class EvalCollate:
    """Build the evaluation batch of :mod:`pefttune.data.preprocessing` from evaluation items.

    The items come from :class:`ImageWithCaptionsDataset`: B images and the T captions of all of them.

    Args:
        tokenize: The preprocessing's ``tokenize``.
    """

    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack images, tokenize every caption and gather ids."""
        captions = [caption for item in items for caption in item["captions"]]
        input_ids, attention_mask = _tokenize(self.tokenize, captions)
        return _stack_images(items) | {
            "image_ids": _ids([item["image_id"] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "caption_ids": _ids([cid for item in items for cid in item["caption_ids"]]),
            "caption_image_ids": _ids([item["image_id"] for item in items for _ in item["captions"]]),
            "text_ids": _ids([tid for item in items for tid in item["text_ids"]]),
        }


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before every pass, and resumes mid-epoch.

    Lightning calls ``set_epoch`` only on samplers; the caption draw of :class:`PairDataset` and the shard
    order of a WebDataset stream live in the dataset, so this loader calls ``dataset.set_epoch`` in
    ``__iter__`` (in the main process, before workers prefetch). With ``shuffle_seed`` it also reseeds its
    ``generator`` from ``(shuffle_seed, epoch)``, making the shuffle of each epoch reproducible, resumes
    included. Lightning can rebuild it with a ``DistributedSampler``: its extra arguments are attributes.

    Mid-epoch resume: the loader is stateful (``state_dict``/``load_state_dict``), so Lightning stores in
    every checkpoint the epoch and how many batches of it the training steps consumed, and hands them back on
    resume. The next pass over that epoch then skips those batches at the sampler (indices are drawn, no item
    is loaded), so a resumed map-style epoch continues with exactly the batches the uninterrupted run would
    have seen. A stream (:class:`~pefttune.data.sources.webdataset.WebDatasetStream`) has no index to skip: a
    resumed epoch starts a fresh pass with that epoch's shuffle and Lightning stops it after the remaining
    number of batches, so resuming a stream mid-epoch is approximate.

    Args:
        dataset: The dataset.
        *args: Passed to :class:`torch.utils.data.DataLoader`.
        epoch_source: Returns the current epoch (e.g. the trainer's), or None to count passes instead.
        shuffle_seed: Seed for the per-epoch shuffle; needs ``generator`` (made when missing).
        **kwargs: Passed to :class:`torch.utils.data.DataLoader`.
    """

    #: Batches Lightning's training data fetcher has taken from the loader beyond the step being run when a
    #: checkpoint is written: none for a loader with a length (Lightning 2.6 knows the last batch from the
    #: length and fetches each batch when its step starts).
    lookahead: int = 0

    def __init__(
        self,
        dataset: Dataset,
        *args: Any,
        epoch_source: Callable[[], int | None] | None = None,
        shuffle_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if shuffle_seed is not None and kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, *args, **kwargs)
        self.epoch_source = epoch_source
        self.shuffle_seed = shuffle_seed
        self._passes = 0
        self._epoch: int | None = None
        self._yielded = 0
        self._exhausted = False
        self._skip = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Any:
        """Set the epoch on the dataset (and the shuffle generator), then iterate (resumed if restored).

        The work is done when the first batch is asked for, not when the iterator is made: Lightning makes
        the training iterator early (when the optimizer setup asks for the number of steps), before a
        resumed run has restored its epoch and this loader's state.
        """
        return self._lazy()

    def _lazy(self) -> Iterator[Any]:
        epoch = self.epoch_source() if self.epoch_source is not None else None
        if epoch is None:
            epoch = self._passes
        self._passes += 1
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if self.shuffle_seed is not None and self.generator is not None:
            self.generator.manual_seed(stable_id(f"shuffle\x00{self.shuffle_seed}\x00{epoch}"))
        resume, self._resume = self._resume, None
        skip = 0
        resumable = not isinstance(self.dataset, IterableDataset)
        if resume is not None and resumable and resume.get("epoch") == epoch:
            skip = max(0, int(resume.get("batches", 0)))
            if skip >= len(self):
                skip = 0  # the epoch had ended; Lightning starts the next one
        self._epoch, self._yielded, self._exhausted, self._skip = epoch, skip, False, skip
        iterator = super().__iter__()
        self._skip = 0  # the sampler iterator was created (and advanced) above
        yield from self._counted(iterator)

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch
        self._exhausted = True

    @property
    def _index_sampler(self) -> Any:
        # DataLoader draws its (batch) indices from here when it creates an iterator (and when persistent
        # workers reset); skipping there drops the consumed batches without loading their items.
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of its batches the training steps consumed (read by Lightning)."""
        if self._epoch is None:
            return {}
        consumed = self._yielded if self._exhausted else max(0, self._yielded - self.lookahead)
        return {"epoch": int(self._epoch), "batches": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next pass over ``state_dict["epoch"]`` after its first ``state_dict["batches"]``."""
        self._resume = dict(state_dict) if state_dict else None


class _SkipFirst:
    """An iterable over ``source`` without its first ``count`` elements (with the source's length)."""

    def __init__(self, source: Any, count: int) -> None:
        self.source = source
        self.count = count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.source), self.count, None)

    def __len__(self) -> int:
        return max(0, len(self.source) - self.count)
