"""A decoded-image cache: the deterministic start of an image transform, stored once as uint8 on disk.

Every epoch a data loader decodes each JPEG again and resizes it, although for evaluation (and for
training without random augmentation) the result is the same every time. :class:`DecodedImageCache`
splits a torchvision ``Compose`` (``transforms.v2`` or the classic ``transforms``, as timm builds them)
into

* its **deterministic uint8 prefix**: the leading ``Resize`` and ``CenterCrop`` steps and conversions to
  a uint8 tensor (``ToImage``, ``PILToTensor``), in any order; its output is either a PIL image (timm:
  resize and crop on PIL, then ``ToTensor``) or a uint8 tensor (torchvision v2: ``ToImage`` first), and
* the **rest** (random crops and flips, ``ToTensor`` / ``ToDtype``, ``Normalize``), which runs on every
  load,

and stores the prefix's output of every image as uint8 in a memory-mapped file, one fixed-size slot per
image. A later load of the image reads its slot (no decoding, no resizing), turns it back into a PIL image
or a tensor image as the prefix produced it, and applies the rest, so the result is bitwise what the
transform gives. With a transform whose first step is random (e.g. ``RandomResizedCrop``) the prefix is
empty: the decoded image is stored at full resolution (images of one size only) and every step runs on it.

**Keys.** The cache of a transform and a set of images lives in ``directory/<digest>/``, the digest of
the prefix (each step's ``repr``: sizes, interpolation, antialiasing) and of every image's identity: a
file's real path, size and modification time; the content hash of in-memory bytes; a tar member's shard,
offset and size. A changed file or transform therefore gets a new cache rather than stale pixels. Image
sources without an identity (a callable that draws an image) are not cached; they are decoded every time
and counted in :attr:`DecodedImageCache.stats`.

**Concurrency.** The files are created once under a file lock; each slot has a one-byte flag set only
after its pixels are written, so DataLoader workers (forked or spawned, each opening its own maps) and
later runs share the cache safely; two workers filling the same slot write the same bytes.

**Use.** A dataset calls ``cache.load(record.image, decode)`` where it would call
``transform(decode())``; see :class:`CachedImageSource` for the contract and the data module's
``image_cache_dir`` option.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torchvision import transforms as T1
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from pefttune.data.preprocessing import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "CacheStats",
    "CachedImageSource",
    "DecodedImageCache",
    "SharedIdSet",
    "SkipsCachedImages",
    "image_identity",
    "resizes_or_crops",
    "split_transform",
]

# Steps whose output depends on the input image alone (no random draw) and keeps it uint8.
_TO_UINT8_TENSOR = (T.ToImage, T.PILToTensor, T1.PILToTensor)
_RESIZE_OR_CROP = (T.Resize, T.CenterCrop, T1.Resize, T1.CenterCrop)
_COMPOSE = (T.Compose, T1.Compose)


@runtime_checkable
class CachedImageSource(Protocol):
    """What a dataset needs from an image cache: the transformed image of a source, decoded if needed."""

    def load(self, source: Any, decode: Callable[[], Image.Image]) -> torch.Tensor:
        """The transform's output for ``source``; ``decode()`` gives its RGB PIL image on a cache miss."""
        ...


def split_transform(transform: ImageTransform) -> tuple[Any, Any]:
    """Split a torchvision ``Compose`` into its deterministic uint8 prefix and the rest.

    Args:
        transform: A ``torchvision.transforms.v2.Compose`` or ``torchvision.transforms.Compose``.

    Returns:
        ``(prefix, rest)``, both of the transform's ``Compose`` class; ``rest(prefix(image))`` equals
        ``transform(image)``. The prefix may be empty.

    Raises:
        ValueError: If the transform is not a torchvision ``Compose``.
    """
    if not isinstance(transform, _COMPOSE):
        raise ValueError(
            "the decoded-image cache needs a torchvision Compose (transforms.v2 or transforms) whose first "
            f"steps are deterministic (Resize, CenterCrop, ToImage), got {transform!r}"
        )
    steps = list(transform.transforms)
    cut = 0
    while cut < len(steps) and isinstance(steps[cut], _RESIZE_OR_CROP + _TO_UINT8_TENSOR):
        cut += 1
    compose = type(transform)
    return compose(steps[:cut]), compose(steps[cut:])


def resizes_or_crops(prefix: Any) -> bool:
    """Whether a prefix from :func:`split_transform` makes the image smaller or fixed-size (worth caching)."""
    return any(isinstance(step, _RESIZE_OR_CROP) for step in prefix.transforms)


def _to_uint8_array(prefixed: Any) -> np.ndarray | None:
    """The prefix's output as uint8: [H, W, 3] for an RGB PIL image, [C, H, W] for a tensor (else None)."""
    if isinstance(prefixed, Image.Image):
        return np.asarray(prefixed) if prefixed.mode == "RGB" else None
    if isinstance(prefixed, torch.Tensor) and prefixed.dtype == torch.uint8:
        return prefixed.numpy()
    return None


def image_identity(source: Any) -> str | None:
    """A string that changes whenever the image behind ``source`` may have changed, or None.

    Files: real path, size and modification time. Bytes: their SHA-1. Tar members (anything with
    ``shard``, ``offset`` and ``size`` attributes): the shard's identity plus offset and size. Other
    sources (callables) have none.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.path.realpath(os.fspath(source))
        try:
            stat = os.stat(path)
        except OSError:
            return None  # decoding will report the missing file with the record named
        return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.sha1(bytes(source)).hexdigest()
    shard, offset, size = (getattr(source, name, None) for name in ("shard", "offset", "size"))
    if shard is not None and offset is not None and size is not None:
        shard_identity = image_identity(shard)
        return None if shard_identity is None else f"tar:{shard_identity}:{offset}:{size}"
    return None


@dataclass
class CacheStats:
    """Loads served from the cache (``hits``), decoded and stored (``misses``), and never cacheable.

    ``uncacheable`` counts loads of sources without an identity, of images the cache was not built for,
    and of images whose prefix output has another shape than the cache's slots (images of other sizes
    when the prefix does not crop to a fixed size). Counts are per process (each DataLoader worker has
    its own).
    """

    hits: int = 0
    misses: int = 0
    uncacheable: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count one load that could not use the cache."""
        self.uncacheable += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class DecodedImageCache:
    """Memory-mapped uint8 cache of a transform's deterministic prefix, one slot per image.

    Args:
        directory: Where caches live; this one is ``directory/<digest of transform prefix and images>``.
        transform: The image transform (a torchvision ``Compose``); see :func:`split_transform`.
        sources: Every image source the cache serves (a dataset's ``record.image`` values); sources that
            repeat share a slot.

    Raises:
        ValueError: If the transform cannot be split (see :func:`split_transform`).
    """

    def __init__(
        self, directory: str | os.PathLike, transform: ImageTransform, sources: Sequence[Any]
    ) -> None:
        self.prefix, self.rest = split_transform(transform)
        identities = [image_identity(source) for source in sources]
        self._slots: dict[str, int] = {}
        for identity in identities:
            if identity is not None and identity not in self._slots:
                self._slots[identity] = len(self._slots)
        digest = hashlib.sha256()
        digest.update(json.dumps([repr(step) for step in self.prefix.transforms]).encode())
        for identity in self._slots:
            digest.update(identity.encode() + b"\0")
        self.path = Path(directory) / digest.hexdigest()[:20]
        self.stats = CacheStats()
        self._shape: tuple[int, ...] | None = None
        self._layout: str | None = None
        self._maps: tuple[np.memmap, np.memmap] | None = None
        self._pid = -1

    def __len__(self) -> int:
        """Number of distinct cacheable images."""
        return len(self._slots)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps stay behind; each process (a spawned DataLoader worker) opens its own.
        state = self.__dict__.copy()
        state["_maps"] = None
        state["_pid"] = -1
        return state

    @property
    def filled(self) -> int:
        """How many slots hold an image (0 before the cache files exist)."""
        maps = self._open(None, None)
        return 0 if maps is None else int(np.count_nonzero(maps[1]))

    # -- files ---------------------------------------------------------------------------------------
    def _open(self, shape: tuple[int, ...] | None, layout: str | None) -> tuple[np.memmap, np.memmap] | None:
        """The (pixels, flags) maps; created with ``shape`` slots of ``layout`` if missing and given."""
        if self._maps is not None and self._pid == os.getpid():
            return self._maps
        meta = self.path / "meta.json"
        if not meta.exists():
            if shape is None:
                return None
            self.path.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path / "create.lock")):
                if not meta.exists():
                    self._create(shape, layout or "tensor")
        info = json.loads(meta.read_text(encoding="utf-8"))
        self._shape = tuple(info["shape"])
        self._layout = info["layout"]
        count = int(info["count"])
        pixels = np.memmap(self.path / "pixels.u8", dtype=np.uint8, mode="r+", shape=(count, *self._shape))
        flags = np.memmap(self.path / "filled.u8", dtype=np.uint8, mode="r+", shape=(count,))
        self._maps, self._pid = (pixels, flags), os.getpid()
        return self._maps

    def _create(self, shape: tuple[int, ...], layout: str) -> None:
        count = max(len(self._slots), 1)
        slot_bytes = int(np.prod(shape))
        # Sparse files: disk blocks are used only as slots fill.
        with open(self.path / "pixels.u8", "wb") as handle:
            handle.truncate(count * slot_bytes)
        with open(self.path / "filled.u8", "wb") as handle:
            handle.truncate(count)
        meta = {
            "shape": list(shape),
            "layout": layout,
            "count": count,
            "prefix": [repr(s) for s in self.prefix.transforms],
        }
        # Written last: its presence says the data files are complete.
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, self.path / "meta.json")
        logger.info("decoded-image cache %s: %d slots of %s uint8", self.path, count, shape)

    # -- loading -------------------------------------------------------------------------------------
    def load(self, source: Any, decode: Callable[[], Image.Image]) -> torch.Tensor:
        """The full transform's output for ``source``, from its cached prefix output when stored.

        Args:
            source: The record's image source (its identity selects the slot).
            decode: Returns the RGB PIL image; called only on a miss (and for uncacheable sources).

        Returns:
            ``rest(prefix(image))``, bitwise equal to ``transform(image)``.
        """
        identity = image_identity(source)
        slot = None if identity is None else self._slots.get(identity)
        if slot is None:
            self.stats.skip("no identity" if identity is None else "not in this cache")
            return self.rest(self.prefix(decode()))
        maps = self._open(None, None)
        if maps is not None and maps[1][slot]:
            self.stats.hits += 1
            pixels = np.array(maps[0][slot])
            if self._layout == "pil":
                return self.rest(Image.fromarray(pixels))
            return self.rest(tv_tensors.Image(torch.from_numpy(pixels)))
        image = decode()
        prefixed = self.prefix(image) if self.prefix.transforms else image
        array = _to_uint8_array(prefixed)
        if array is None:  # not RGB / not uint8: nothing exact to store
            self.stats.skip("not uint8 RGB")
            return self.rest(prefixed)
        layout = "pil" if isinstance(prefixed, Image.Image) else "tensor"
        maps = self._open(tuple(array.shape), layout)
        assert maps is not None
        if tuple(array.shape) != self._shape or layout != self._layout:
            self.stats.skip("other shape")
            return self.rest(prefixed)
        pixels, flags = maps
        pixels[slot] = array
        flags[slot] = 1  # after the pixels: a set flag always means a complete slot
        self.stats.misses += 1
        return self.rest(prefixed)


# ---------------------------------------------------------------------------------------------------------
# Skipping images whose features are cached


class SharedIdSet:
    """A set of ids in ``[0, size)`` held in shared memory, so DataLoader workers see additions at once.

    The model adds the ids of images whose (locked tower's) features it has cached; the training dataset's
    workers read it to skip loading those images. Works with forked and spawned workers (a shared-memory
    tensor travels by handle), like :class:`~pefttune.data.datasets.PairDataset`'s epoch counter.

    Args:
        size: One more than the largest id (the number of images of a map-style dataset).
    """

    def __init__(self, size: int) -> None:
        self._flags = torch.zeros(max(int(size), 1), dtype=torch.uint8).share_memory_()

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self._flags) and bool(self._flags[index])

    def __len__(self) -> int:
        return int(self._flags.sum())

    def add(self, ids: Sequence[int]) -> None:
        """Add ids (those outside ``[0, size)`` are ignored: they cannot be skipped)."""
        for index in ids:
            if 0 <= index < len(self._flags):
                self._flags[index] = 1

    def clear(self) -> None:
        """Remove every id (the features they stood for are gone)."""
        self._flags.zero_()


@runtime_checkable
class SkipsCachedImages(Protocol):
    """A training dataset that can leave out the images of given ids (see :class:`SharedIdSet`).

    A skipped image's ``image`` is a tensor of the transform's output shape filled with NaN, so that a
    skipped image reaching a tower by mistake cannot pass for data (the model checks and raises).
    """

    skip_images: SharedIdSet | None

    @property
    def num_images(self) -> int:
        """One more than the largest image id the dataset yields."""
        ...
