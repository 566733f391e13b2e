"""Generated moving-shape clips whose captions need time to be right: the offline video default.

Each clip shows one coloured shape on a dark background doing one of eight *motions*, in four pairs that
are each other's reversal in time:

- ``left to right`` / ``right to left``: the shape crosses the frame horizontally;
- ``top to bottom`` / ``bottom to top``: vertically;
- ``grows`` / ``shrinks``: it stays in place while its size changes from small to large (or back);
- ``appears`` / ``disappears``: the background is empty for the first (last) half of the clip.

A clip of a motion is *exactly* the frame-reversed clip of its partner (frame ``t`` of one is frame
``n - 1 - t`` of the other), so the two have the same set of frames and therefore the same mean frame
embedding: mean pooling over time (CLIP4Clip ``meanP``) cannot tell "a red circle moves from left to right"
from "a red circle moves from right to left", while a temporal module that sees frame order can
(:class:`~pefttune.towers.temporal.SequenceTransformer`). The record's ``label`` is the motion, so the same
data can also be scored as zero-shot motion classification.

Each clip has five differently worded captions naming the colour, the shape and the motion (synonyms,
templates); captions are never true of the reversed clip. Everything is a function of ``(seed, split,
index)``: the same seed gives the same pixels and captions, and the size of one split does not change the
others. Frames render when loaded (the records hold picklable frame descriptions, no pixels): about 0.1 ms
per 64 px frame.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord
from pefttune.data.sources.base import Source

# One palette for generated images and clips, so a colour word means the same pixels in both.
from pefttune.data.sources.synthetic import COLOURS
from pefttune.data.video import FrameListVideo

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "dark grey": (70, 70, 70),
    "dark blue": (20, 28, 70),
}
# Forward motions and their reversals in time.
REVERSED: dict[str, str] = {
    "left to right": "right to left",
    "top to bottom": "bottom to top",
    "grows": "shrinks",
    "appears": "disappears",
}
REVERSED |= {backward: forward for forward, backward in REVERSED.items()}
MOTIONS: tuple[str, ...] = (
    "left to right",
    "right to left",
    "top to bottom",
    "bottom to top",
    "grows",
    "shrinks",
    "appears",
    "disappears",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
_FORWARD = ("left to right", "top to bottom", "grows", "appears")

_RADIUS = 0.13  # of the frame side, for moving and appearing shapes
_SMALL, _LARGE = 0.06, 0.24  # radii at the ends of "grows"
_TRAVEL = (0.18, 0.82)  # centre coordinate at the ends of a crossing
_JITTER = 0.05

# Captions per motion: {a} is "a"/"an" + colour + shape, {shape} the bare shape word, {colour} the colour.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "left to right": (
        "{a} moves from left to right",
        "{a} slides from the left side to the right side",
        "{a} travels rightwards across the frame",
        "the {colour} {shape} goes from the left to the right",
        "{a} moving left to right on a {background} background",
    ),
    "right to left": (
        "{a} moves from right to left",
        "{a} slides from the right side to the left side",
        "{a} travels leftwards across the frame",
        "the {colour} {shape} goes from the right to the left",
        "{a} moving right to left on a {background} background",
    ),
    "top to bottom": (
        "{a} moves from top to bottom",
        "{a} falls from the top to the bottom",
        "{a} travels downwards across the frame",
        "the {colour} {shape} goes down from the top",
        "{a} moving top to bottom on a {background} background",
    ),
    "bottom to top": (
        "{a} moves from bottom to top",
        "{a} rises from the bottom to the top",
        "{a} travels upwards across the frame",
        "the {colour} {shape} goes up from the bottom",
        "{a} moving bottom to top on a {background} background",
    ),
    "grows": (
        "{a} grows",
        "{a} gets bigger and bigger",
        "a small {colour} {shape} becomes large",
        "the {colour} {shape} expands",
        "{a} growing on a {background} background",
    ),
    "shrinks": (
        "{a} shrinks",
        "{a} gets smaller and smaller",
        "a large {colour} {shape} becomes small",
        "the {colour} {shape} contracts",
        "{a} shrinking on a {background} background",
    ),
    "appears": (
        "{a} appears",
        "{a} comes into view",
        "an empty {background} background, then {a} shows up",
        "the {colour} {shape} appears halfway through",
        "{a} pops up on a {background} background",
    ),
    "disappears": (
        "{a} disappears",
        "{a} vanishes",
        "{a} is shown, then the {background} background is empty",
        "the {colour} {shape} disappears halfway through",
        "{a} fades out from a {background} background",
    ),
}


@dataclass(frozen=True)
class Clip:
    """What one generated clip shows (its frames and captions are derived from it).

    Attributes:
        colour: Colour name (a key of :data:`COLOURS`).
        shape: Shape name (one of :data:`SHAPES`).
        motion: One of :data:`MOTIONS`.
        background: Background name (a key of :data:`BACKGROUNDS`).
        num_frames: Frames in the clip.
        offset: Displacement of the path perpendicular to the motion (or of the resting place), as a fraction
            of the frame side.
    """

    colour: str
    shape: str
    motion: str
    background: str
    num_frames: int
    offset: tuple[float, float] = (0.0, 0.0)

    def reversed(self) -> Clip:
        """The same clip played backwards: the partner motion (its frames are this clip's in reverse)."""
        return replace(self, motion=REVERSED[self.motion])

    def state(self, t: int) -> tuple[float, float, float] | None:
        """Centre ``(x, y)`` and radius of the shape in frame ``t`` (fractions of the side); None: hidden."""
        if self.motion not in _FORWARD:
            # A backward motion is its forward partner read from the end: exactly reversed frames.
            return self.reversed().state(self.num_frames - 1 - t)
        progress = t / max(self.num_frames - 1, 1)
        dx, dy = self.offset
        if self.motion == "left to right":
            return _TRAVEL[0] + progress * (_TRAVEL[1] - _TRAVEL[0]), 0.5 + dy, _RADIUS
        if self.motion == "top to bottom":
            return 0.5 + dx, _TRAVEL[0] + progress * (_TRAVEL[1] - _TRAVEL[0]), _RADIUS
        if self.motion == "grows":
            return 0.5 + dx, 0.5 + dy, _SMALL + progress * (_LARGE - _SMALL)
        # appears: empty for the first half (rounded down), shown for the rest
        return (0.5 + dx, 0.5 + dy, _RADIUS) if t >= self.num_frames // 2 else None


@dataclass(frozen=True)
class ClipFrame:
    """One frame of a generated clip, rendered when called (picklable: workers render it).

    Attributes:
        clip: The clip.
        index: The frame's index in the clip.
        image_size: Side of the square frame in pixels.
    """

    clip: Clip
    index: int
    image_size: int

    def __call__(self) -> Image.Image:
        """Render the frame as an RGB image."""
        return render_frame(self.clip, self.index, self.image_size)


def render_frame(clip: Clip, index: int, image_size: int) -> Image.Image:
    """Draw frame ``index`` of ``clip`` as an ``image_size`` square RGB image."""
    if not 0 <= index < clip.num_frames:
        raise IndexError(f"frame {index} of a clip with {clip.num_frames} frames")
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[clip.background])
    state = clip.state(index)
    if state is not None:
        x, y, radius = (value * image_size for value in state)
        _draw_shape(ImageDraw.Draw(image), clip.shape, x, y, radius, COLOURS[clip.colour])
    return image


def render_clip(clip: Clip, image_size: int) -> list[Image.Image]:
    """Every frame of ``clip``, in time order."""
    return [render_frame(clip, index, image_size) for index in range(clip.num_frames)]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, colour: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        side = r * 0.9
        draw.rectangle((x - side, y - side, x + side, y + side), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def clip_captions(clip: Clip) -> list[str]:
    """The five captions of a clip (colour, shape and motion; never true of the reversed clip)."""
    colour_shape = f"{clip.colour} {clip.shape}"
    article = "an" if colour_shape[0] in "aeiou" else "a"
    fields = {
        "a": f"{article} {colour_shape}",
        "colour": clip.colour,
        "shape": clip.shape,
        "background": clip.background,
    }
    return [template.format(**fields) for template in _TEMPLATES[clip.motion]]


class SyntheticVideos(Source):
    """Generated moving-shape clips with time-dependent captions (see the module docstring).

    Args:
        num_train: Clips in the training split.
        num_val: Clips in the validation split.
        num_test: Clips in the test split.
        num_frames: Frames per clip (at least 2; the model samples its own number of frames from them).
        image_size: Side of the square frames in pixels (at least 16).
        seed: Seed of everything: same seed, same pixels and captions.
        motions: The motions to generate (default: all eight of :data:`MOTIONS`), drawn uniformly.

    Raises:
        ValueError: For a size, frame count or image size out of range, or an unknown motion.
    """

    check_files = False

    def __init__(
        self,
        num_train: int = 256,
        num_val: int = 64,
        num_test: int = 64,
        num_frames: int = 8,
        image_size: int = 64,
        seed: int = 0,
        motions: Sequence[str] | None = None,
    ) -> None:
        for name, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if count < 0:
                raise ValueError(f"{name} must be >= 0, got {count}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be at least 2 (a motion needs time), got {num_frames}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        chosen = tuple(motions) if motions is not None else MOTIONS
        unknown = [m for m in chosen if m not in MOTIONS]
        if unknown or not chosen:
            raise ValueError(f"unknown motions {unknown or '(none given)'}; expected some of {MOTIONS}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.num_frames = num_frames
        self.image_size = image_size
        self.seed = seed
        self.motions = chosen

    def describe(self) -> str:
        """Names the generated data set in messages."""
        return f"generated moving-shape clips (seed {self.seed})"

    def class_names(self) -> list[str]:
        """The motions, the records' labels."""
        return list(self.motions)

    def clip(self, split: str, index: int) -> Clip:
        """The clip at ``index`` of ``split`` (what its frames and captions are generated from)."""
        if split not in self.sizes:
            raise DataFormatError(f"{self.describe()}: no split {split!r}; expected one of {SPLITS}")
        # A string seed is hashed with SHA-512 by `random`: independent of PYTHONHASHSEED.
        rng = random.Random(f"synthetic-videos/{self.seed}/{split}/{index}")
        motion = rng.choice(self.motions)
        offset = (rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER))
        return Clip(
            colour=rng.choice(list(COLOURS)),
            shape=rng.choice(SHAPES),
            motion=motion,
            background=rng.choice(list(BACKGROUNDS)),
            num_frames=self.num_frames,
            offset=offset,
        )

    def record(self, split: str, index: int) -> ImageCaptionRecord:
        """The record of one clip: a lazily rendered :class:`~pefttune.data.video.FrameListVideo`."""
        clip = self.clip(split, index)
        name = f"generated clip {split}[{index}]"
        frames = [ClipFrame(clip, t, self.image_size) for t in range(clip.num_frames)]
        return ImageCaptionRecord(
            image_id=f"clip-{split}-{index:05d}",
            image=FrameListVideo(frames=frames, name=name),
            captions=clip_captions(clip),
            split=split,
            label=clip.motion,
            origin=name,
        )

    def read(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """Every clip of every split (the data module selects the split it needs).

        Args:
            split: Ignored: generated clips carry their own split.
            policy: Unused: generated records are valid by construction.
        """
        return [self.record(name, index) for name in SPLITS for index in range(self.sizes[name])]


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "MOTIONS",
    "REVERSED",
    "SHAPES",
    "Clip",
    "ClipFrame",
    "SyntheticVideos",
    "clip_captions",
    "render_clip",
    "render_frame",
]
