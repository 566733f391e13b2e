"""Videos as sequences of frames: the :class:`Video` protocol, its three implementations, and frame sampling.

A video record is an :class:`~pefttune.data.records.ImageCaptionRecord` whose ``image`` is a :class:`Video`.
Three kinds of video are read:

- :class:`FrameFolderVideo`: a folder of frame images (``frames/<video_id>/00012.jpg``), in the order of
  their file names (numbers compared as numbers, so ``2.jpg`` comes before ``10.jpg``);
- :class:`VideoFileVideo`: an encoded file (``.mp4``, ``.webm``, ``.avi``, ...) decoded with PyAV (``av`` on
  PyPI ships its own FFmpeg libraries: no system FFmpeg is needed); :class:`EncodedVideo` the same from bytes
  (a WebDataset ``.mp4`` member);
- :class:`FrameListVideo`: frames given as image sources (paths, encoded bytes or callables), e.g. the frames
  of a WebDataset sample or generated clips.

Frame sampling (:class:`FrameSampler`): by default (``"segments"``, TSN-style) a clip of ``n`` frames is cut
into ``T`` equal segments; training takes one frame at a random offset inside each segment (drawn from a
generator seeded by the data set with ``(seed, epoch, item)``, so a run is reproducible and resumable),
evaluation takes each segment's centre frame (deterministic). ``"linspace"`` takes the frames
``floor(linspace(0, n - 1, T))`` in training and evaluation alike: CLIP4Clip's ``--slice_framepos 2``, which
the Cross-Modal Adapter repository uses. A clip with fewer than ``T`` frames gives all of
its frames once, in order, and the remaining slots are padding: a zero tensor whose ``frame_mask`` is False
and whose ``frame_index`` is -1, so temporal pooling can ignore them. A clip with no frame, a missing folder
or an undecodable file raises :class:`~pefttune.data.records.VideoLoadError` naming the file (a data module
with ``validate_images=True`` and ``on_error="skip"`` drops and counts such videos at setup instead).
"""

from __future__ import annotations

import abc
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from pefttune.data.records import ImageSource, VideoLoadError

FRAME_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")


@runtime_checkable
class Video(Protocol):
    """What the data pipeline needs from a video: how many frames it has, and some of them as images."""

    def num_frames(self) -> int:
        """Number of frames available (on disk or decodable)."""
        ...

    def read_frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """The frames at ``indices`` (ascending or not, repeats allowed), as loaded PIL images."""
        ...

    def describe(self) -> str:
        """Names the video (its path or id) in error messages."""
        ...


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_indices(video: Video, indices: Sequence[int], count: int) -> None:
    bad = [index for index in indices if not 0 <= index < count]
    if bad:
        raise VideoLoadError(f"{video.describe()}: frame index {bad[0]} out of range for {count} frame(s)")


@dataclass(frozen=True)
class FrameFolderVideo:
    """A video stored as one image file per frame in a folder.

    Attributes:
        path: The folder.
        extensions: File name endings (lower case) counted as frames.
    """

    path: str
    extensions: tuple[str, ...] = FRAME_EXTENSIONS
    _files: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def frame_files(self) -> list[str]:
        """The frame files in order (listed once, then remembered)."""
        if not self._files:
            if not os.path.isdir(self.path):
                raise VideoLoadError(f"frame folder not found: {self.path}")
            names = [
                name
                for name in os.listdir(self.path)
                if name.lower().endswith(self.extensions) and not name.startswith(".")
            ]
            self._files.extend(os.path.join(self.path, name) for name in sorted(names, key=_natural_key))
        return self._files

    def num_frames(self) -> int:
        """Number of frame files in the folder."""
        return len(self.frame_files())

    def read_frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """Load the frame files at ``indices`` as RGB images."""
        from pefttune.data.datasets import load_image

        files = self.frame_files()
        _check_indices(self, indices, len(files))
        return [load_image(files[index], record=f"frame {index} of {self.path}") for index in indices]

    def describe(self) -> str:
        """The folder's path."""
        return f"frame folder {self.path}"


def _decode(open_container: Callable[[], Any], name: str, last: int | None) -> list[Image.Image]:
    """Decode frames ``0..last`` (all when None) of the first video stream, as RGB images."""
    try:
        container = open_container()
    except VideoLoadError:
        raise
    except Exception as err:  # PyAV raises InvalidDataError, OSError, ... for bad input
        raise VideoLoadError(
            f"cannot open {name}: {type(err).__name__}: {err} (corrupt or not a video)"
        ) from err
    frames: list[Image.Image] = []
    try:
        if not container.streams.video:
            raise VideoLoadError(f"{name}: no video stream (audio only?)")
        for frame in container.decode(video=0):
            frames.append(frame.to_image().convert("RGB"))
            if last is not None and len(frames) > last:
                break
    except VideoLoadError:
        raise
    except Exception as err:
        raise VideoLoadError(
            f"cannot decode {name} after {len(frames)} frame(s): {type(err).__name__}: {err}"
        ) from err
    finally:
        container.close()
    return frames


class _DecodedVideo(abc.ABC):
    """Shared logic of the encoded videos: count frames by decoding once, read by decoding up to an index."""

    _count: list[int]

    @abc.abstractmethod
    def describe(self) -> str:
        """Name the video in messages (its file, or where its bytes came from)."""

    @abc.abstractmethod
    def _open(self) -> Any:
        """Open the container for PyAV."""

    def num_frames(self) -> int:
        """Number of decodable frames (decoded once, then remembered; container metadata is unreliable)."""
        if not self._count:
            self._count.append(len(_decode(self._open, self.describe(), None)))
        return self._count[0]

    def read_frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """Decode up to the largest index and return the frames at ``indices``.

        Frames are decoded in one sequential pass: for short clips that is the cost of the decode, and seeking
        is unreliable across codecs.
        """
        if not indices:
            return []
        frames = _decode(self._open, self.describe(), max(indices))
        _check_indices(self, indices, len(frames))
        return [frames[index] for index in indices]


@dataclass(frozen=True)
class VideoFileVideo(_DecodedVideo):
    """An encoded video file (``.mp4``, ``.webm``, ...) decoded with PyAV.

    Attributes:
        path: The video file.
    """

    path: str
    _count: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def _open(self) -> Any:
        import av

        if not os.path.isfile(self.path):
            raise VideoLoadError(f"video file not found: {self.path}")
        if os.path.getsize(self.path) == 0:
            raise VideoLoadError(f"video file is empty (0 bytes): {self.path}")
        return av.open(self.path)

    def describe(self) -> str:
        """The file's path."""
        return f"video file {self.path}"


@dataclass(frozen=True)
class EncodedVideo(_DecodedVideo):
    """A video held as encoded bytes (e.g. the ``.mp4`` member of a WebDataset sample), decoded from memory.

    Attributes:
        data: The encoded file's bytes, or an object whose ``read()`` gives them (a lazy tar member).
        name: Names the video in error messages.
    """

    data: bytes | Any
    name: str = "encoded video"
    _count: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def _open(self) -> Any:
        import av

        # A lazy tar member (pefttune.data.sources.webdataset.TarMember) is read when the clip is decoded.
        data = self.data if isinstance(self.data, (bytes, bytearray)) else self.data.read()
        if not data:
            raise VideoLoadError(f"{self.name}: encoded video is empty (0 bytes)")
        return av.open(io.BytesIO(data))

    def describe(self) -> str:
        """The name given at construction."""
        return self.name


@dataclass(frozen=True)
class FrameListVideo:
    """A video given as a list of frame image sources (paths, encoded bytes or zero-argument callables).

    Attributes:
        frames: The frames in time order.
        name: Names the video in error messages (e.g. ``"shard-0001.tar, sample 'v12'"``).
    """

    frames: Sequence[ImageSource] | Callable[[], Sequence[ImageSource]]
    name: str = "frame list"

    def _frames(self) -> Sequence[ImageSource]:
        return self.frames() if callable(self.frames) else self.frames

    def num_frames(self) -> int:
        """Number of frames in the list."""
        return len(self._frames())

    def read_frames(self, indices: Sequence[int]) -> list[Image.Image]:
        """Load the listed frames at ``indices`` as RGB images."""
        from pefttune.data.datasets import load_image

        frames = self._frames()
        _check_indices(self, indices, len(frames))
        return [load_image(frames[index], record=f"frame {index} of {self.name}") for index in indices]

    def describe(self) -> str:
        """The name given at construction."""
        return self.name


def video_from_path(path: str) -> Video:
    """A :class:`FrameFolderVideo` for a folder, a :class:`VideoFileVideo` for anything else."""
    return FrameFolderVideo(path) if os.path.isdir(path) else VideoFileVideo(path)


@dataclass(frozen=True)
class SampledFrames:
    """The frames chosen from one clip.

    Attributes:
        frames: The loaded frames (``len(indices)`` of them; fewer than ``T`` for a short clip).
        indices: Each frame's index in its clip.
        num_slots: ``T``; slots after ``len(frames)`` are padding.
    """

    frames: list[Image.Image]
    indices: list[int]
    num_slots: int


#: Frame sampling schemes of :class:`FrameSampler`.
FRAME_SAMPLING: tuple[str, ...] = ("segments", "linspace")


class FrameSampler:
    """Chooses ``T`` frames of a clip (see the module docstring).

    Args:
        num_frames: ``T``, frames per clip.
        mode: ``"segments"``: one frame per equal segment, at a random offset in training and the centre in
            evaluation. ``"linspace"``: ``floor(linspace(0, n - 1, T))`` always (CLIP4Clip's
            ``slice_framepos 2``, the Cross-Modal Adapter repository's choice).

    Raises:
        ValueError: If ``num_frames < 1`` or ``mode`` is unknown.
    """

    def __init__(self, num_frames: int = 8, mode: str = "segments") -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if mode not in FRAME_SAMPLING:
            raise ValueError(f"frame sampling must be one of {FRAME_SAMPLING}, got {mode!r}")
        self.num_frames = num_frames
        self.mode = mode

    def indices(self, available: int, *, rng: np.random.Generator | None = None) -> list[int]:
        """Frame indices for a clip of ``available`` frames.

        Args:
            available: Frames in the clip (at least 1).
            rng: ``"segments"`` in training: draws one offset per segment. None (evaluation): each
                segment's centre. ``"linspace"`` ignores it.

        Returns:
            ``min(T, available)`` ascending indices; all frames when the clip is shorter than ``T``.

        Raises:
            ValueError: If ``available < 1``.
        """
        if available < 1:
            raise ValueError(f"a clip needs at least one frame, got {available}")
        if available <= self.num_frames:
            return list(range(available))
        if self.mode == "linspace":
            # numpy's float -> int conversion truncates, as CLIP4Clip's np.linspace(..., dtype=int) does.
            return [int(i) for i in np.linspace(0, available - 1, self.num_frames).astype(np.int64)]
        # Segment k covers frames [edges[k], edges[k + 1]); with available > T every segment is non-empty.
        edges = np.linspace(0, available, self.num_frames + 1)
        starts = np.floor(edges[:-1]).astype(np.int64)
        ends = np.maximum(np.floor(edges[1:]).astype(np.int64), starts + 1)
        if rng is None:  # the centre of each (continuous) segment
            return [int((k + 0.5) * available / self.num_frames) for k in range(self.num_frames)]
        return [int(rng.integers(start, end)) for start, end in zip(starts, ends, strict=True)]

    def sample(self, video: Video, *, rng: np.random.Generator | None = None) -> SampledFrames:
        """Count the clip's frames, choose indices and load those frames.

        Raises:
            VideoLoadError: If the video has no frame or cannot be read (the message names it).
        """
        available = video.num_frames()
        if available < 1:
            raise VideoLoadError(f"{video.describe()}: no frames")
        chosen = self.indices(available, rng=rng)
        return SampledFrames(video.read_frames(chosen), chosen, self.num_frames)


__all__ = [
    "FRAME_EXTENSIONS",
    "FRAME_SAMPLING",
    "VIDEO_EXTENSIONS",
    "EncodedVideo",
    "FrameFolderVideo",
    "FrameListVideo",
    "FrameSampler",
    "SampledFrames",
    "Video",
    "VideoFileVideo",
    "video_from_path",
]
