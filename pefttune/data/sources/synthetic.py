"""A generated captioned-scenes dataset: the offline default, needing no files.

Each image shows 1 to 3 coloured shapes on a plain or lightly textured dark background. Attributes:

- colours: red, green, blue, yellow, purple, orange, white;
- shapes: circle, square, triangle, star, diamond, cross;
- sizes: small, large; positions: left, right, top, bottom, centre (one object per position).

The *main* object is the only or the large one (with several objects, the others are small); its
``"colour shape"`` is the record's ``label``, so the same data serves zero-shot classification over
:meth:`Synthetic.class_names` (42 classes). Each image has 5 differently worded captions (templates,
synonyms, varying attribute order) that mention every object and its position.

Compositional split: the colour-shape pairs in :data:`HELD_OUT_PAIRS` (red star, green circle, blue
triangle, yellow square, purple cross, orange diamond) never appear in the train or val splits, neither as
main nor as secondary object. In the test split the main object is a held-out pair with probability
``held_out_fraction`` (default 0.5), so test results can be reported separately for seen and unseen
compositions (:meth:`Synthetic.is_held_out`). Every colour and every shape still occurs in training.

Everything is a function of ``(seed, split, index)``: the same seed gives the same pixels and captions, and
changing the size of one split does not change the others. Images are rendered when loaded (records hold a
picklable :class:`SceneImage`), about 0.1 ms for a 64 px image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord
from pefttune.data.sources.base import Source

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 100, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (18, 18, 18), "dark grey": (70, 70, 70)}
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "circle"),
        ("blue", "triangle"),
        ("yellow", "square"),
        ("purple", "cross"),
        ("orange", "diamond"),
    }
)
SPLITS: tuple[str, ...] = ("train", "val", "test")

_CENTRES = {
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "centre": (0.5, 0.5),
}
_RADII = {"small": 0.09, "large": 0.17}
_JITTER = 0.03
_TEXTURE_AMPLITUDE = 12

_COLOUR_WORDS = {colour: [colour] for colour in COLOURS} | {"purple": ["purple", "violet"]}
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "square shape"],
    "triangle": ["triangle", "triangular shape"],
    "star": ["star", "star shape"],
    "diamond": ["diamond", "rhombus", "diamond shape"],
    "cross": ["cross", "plus sign", "cross shape"],
}
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
_POSITION_WORDS = {
    "left": ["on the left", "at the left side", "to the left"],
    "right": ["on the right", "at the right side", "to the right"],
    "top": ["at the top", "near the top", "in the upper part"],
    "bottom": ["at the bottom", "near the bottom", "in the lower part"],
    "centre": ["in the centre", "in the middle", "at the centre"],
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; ``dx``/``dy`` jitter its centre by a fraction of the image size."""

    colour: str
    shape: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    @property
    def label(self) -> str:
        """The ``"colour shape"`` class name."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: its objects (the first is the main one) and its background."""

    objects: tuple[SceneObject, ...]
    background: str
    textured: bool
    texture_seed: int


@dataclass(frozen=True)
class SceneImage:
    """Zero-argument callable rendering a scene (what a synthetic record's ``image`` holds).

    Attributes:
        scene: The scene.
        image_size: Side of the square image in pixels.
    """

    scene: Scene
    image_size: int

    def __call__(self) -> Image.Image:
        """Render the scene as an RGB image."""
        return render_scene(self.scene, self.image_size)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene with PIL.

    Args:
        scene: What to draw.
        image_size: Side of the square image in pixels.

    Returns:
        An RGB image.
    """
    base = BACKGROUNDS[scene.background]
    if scene.textured:
        noise = np.random.default_rng(scene.texture_seed).integers(
            -_TEXTURE_AMPLITUDE, _TEXTURE_AMPLITUDE + 1, size=(image_size, image_size, 1)
        )
        pixels = np.clip(np.asarray(base, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)  # grey noise: the same offset in all three channels
    else:
        image = Image.new("RGB", (image_size, image_size), base)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy = _CENTRES[obj.position]
        _draw_shape(
            draw,
            obj.shape,
            (cx + obj.dx) * image_size,
            (cy + obj.dy) * image_size,
            _RADII[obj.size] * image_size,
            COLOURS[obj.colour],
        )
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        half = 0.85 * r  # equal visual weight with the circle
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(x, y, [r] * 3, -90.0), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(x, y, [r, 0.45 * r] * 5, -90.0), fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.75 * r, y), (x, y + r), (x - 0.75 * r, y)], fill=fill)
    elif shape == "cross":
        arm = 0.32 * r
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _polygon(x: float, y: float, radii: list[float], start_degrees: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    start = math.radians(start_degrees)
    return [
        (x + r * math.cos(start + i * step), y + r * math.sin(start + i * step)) for i, r in enumerate(radii)
    ]


# ---------------------------------------------------------------------------------------------------------
# Captions


def _pick(rng: random.Random, options: list[str]) -> str:
    return options[rng.randrange(len(options))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: SceneObject, rng: random.Random, form: int) -> str:
    """Describe one object; ``form`` chooses the attribute order."""
    colour = _pick(rng, _COLOUR_WORDS[obj.colour])
    shape = _pick(rng, _SHAPE_WORDS[obj.shape])
    size = _pick(rng, _SIZE_WORDS[obj.size])
    if form == 0:
        return _with_article(f"{size} {colour} {shape}")
    if form == 1:
        return _with_article(f"{colour} {shape} of {size} size")
    if form == 2:
        return _with_article(f"{shape} that is {colour} and {size}")
    return _with_article(f"{colour} {size} {shape}" if obj.size == "small" else f"{size} {colour} {shape}")


def _located(obj: SceneObject, rng: random.Random, form: int) -> str:
    return f"{_noun_phrase(obj, rng, form)} {_pick(rng, _POSITION_WORDS[obj.position])}"


def _join(parts: list[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    last = _pick(rng, [" and ", " with ", " plus "])
    return ", ".join(parts[:-1]) + last + parts[-1]


def _caption(scene: Scene, rng: random.Random, template: int) -> str:
    main, others = scene.objects[0], list(scene.objects[1:])
    if len(others) > 1 and rng.random() < 0.5:
        others.reverse()  # secondary objects are mentioned in either order
    form = rng.randrange(4)
    rest = [_located(obj, rng, rng.randrange(4)) for obj in others]
    described = _join([_located(main, rng, form), *rest], rng)
    background = scene.background
    if template == 0:
        return described
    if template == 1:
        return f"there is {described}"
    if template == 2:
        position = _pick(rng, _POSITION_WORDS[main.position])
        head = f"{position}, {_noun_phrase(main, rng, form)}"
        return _join([head, *rest], rng)
    if template == 3:
        return f"a picture of {described}"
    if template == 4:
        return f"{described} on a {background} background"
    if template == 5:
        return f"an image showing {described}"
    if template == 6:
        count = {1: "one shape", 2: "two shapes", 3: "three shapes"}[len(scene.objects)]
        return f"{count}: {described}"
    return f"a {'textured' if scene.textured else 'plain'} {background} background with {described}"


_NUM_TEMPLATES = 8
CAPTIONS_PER_IMAGE = 5


def describe_scene(scene: Scene, rng: random.Random) -> list[str]:
    """Write :data:`CAPTIONS_PER_IMAGE` distinct captions of a scene, each from a different template."""
    captions: list[str] = []
    for template in rng.sample(range(_NUM_TEMPLATES), CAPTIONS_PER_IMAGE):
        caption = _caption(scene, rng, template)
        while caption in captions:  # synonyms can in principle coincide; redraw them
            caption = _caption(scene, rng, template)
        captions.append(caption)
    return captions


# ---------------------------------------------------------------------------------------------------------
# The dataset


class Synthetic(Source):
    """The generated captioned-scenes dataset (see the module docstring for its content and splits).

    The offline default source: no files needed. Its splits are ``train``, ``val`` and ``test``.

    Args:
        num_train: Number of training images.
        num_val: Number of validation images.
        num_test: Number of test images.
        image_size: Side of the square images in pixels (64 to 224 are sensible).
        seed: Seed of everything: same seed, same pixels and captions.
        held_out_fraction: Share of test images whose main object is a held-out colour-shape pair.
    """

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 128,
        image_size: int = 64,
        seed: int = 0,
        held_out_fraction: float = 0.5,
    ) -> None:
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if not 0.0 <= held_out_fraction <= 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
        for name, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if count < 0:
                raise ValueError(f"{name} must be >= 0, got {count}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = image_size
        self.seed = seed
        self.held_out_fraction = held_out_fraction
        self._seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
        self._held_out = sorted(HELD_OUT_PAIRS)
        self._cache: dict[str, list[ImageCaptionRecord]] = {}

    check_files = False  # images are rendered, not read

    def describe(self) -> str:
        """Names the data set and its sizes."""
        sizes = ", ".join(f"{name} {count}" for name, count in self.sizes.items())
        return f"synthetic scenes ({sizes}; seed {self.seed})"

    def read(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """The records of every non-empty split (``split`` is unused: the data set has its own)."""
        return [record for name, size in self.sizes.items() if size for record in self.split_records(name)]

    def class_names(self) -> list[str]:
        """Every ``"colour shape"`` label that can occur (colour-major order).

        All 42 pairs, or the 36 seen ones with ``held_out_fraction=0`` (the held-out pairs then never occur).
        """
        names = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
        if self.held_out_fraction == 0.0:
            names = [name for name in names if not self.is_held_out(name)]
        return names

    @property
    def held_out_classes(self) -> list[str]:
        """Labels that occur only in the test split."""
        return [f"{colour} {shape}" for colour, shape in self._held_out]

    @staticmethod
    def is_held_out(label: str) -> bool:
        """Whether a ``"colour shape"`` label is one of the held-out compositions."""
        colour, _, shape = label.partition(" ")
        return (colour, shape) in HELD_OUT_PAIRS

    def split_records(self, split: str) -> list[ImageCaptionRecord]:
        """The records of one split (built once, then cached; images render when loaded).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            The records, with image ids ``"scene-<split>-<index>"``.

        Raises:
            DataFormatError: For another split name, or a split of size 0.
        """
        if split not in self.sizes or self.sizes[split] == 0:
            available = ", ".join(f"{name!r} ({n} images)" for name, n in self.sizes.items() if n)
            raise DataFormatError(
                f"synthetic dataset: split {split!r} has no images; available splits: {available or 'none'}"
            )
        if split not in self._cache:
            self._cache[split] = [self._record(split, index) for index in range(self.sizes[split])]
        return self._cache[split]

    def scene(self, split: str, index: int) -> Scene:
        """The scene of one image (what its pixels and captions are generated from)."""
        return self._sample(split, index)[0]

    def _sample(self, split: str, index: int) -> tuple[Scene, random.Random]:
        # A string seed is hashed with SHA-512 by `random`, so it does not depend on PYTHONHASHSEED.
        rng = random.Random(f"synthetic-scenes/{self.seed}/{split}/{index}")
        num_objects = rng.randrange(1, 4)
        positions = rng.sample(range(len(POSITIONS)), num_objects)
        if split == "test" and rng.random() < self.held_out_fraction:
            colour, shape = rng.choice(self._held_out)
        else:
            colour, shape = rng.choice(self._seen)
        main_size = "large" if num_objects > 1 else rng.choice(SIZES)
        objects = [self._object(colour, shape, main_size, POSITIONS[positions[0]], rng)]
        for position in positions[1:]:
            # Secondary objects come from seen pairs (in every split) and differ from the main pair.
            pair = (colour, shape)
            while pair == (colour, shape):
                pair = rng.choice(self._seen)
            objects.append(self._object(pair[0], pair[1], "small", POSITIONS[position], rng))
        scene = Scene(
            objects=tuple(objects),
            background=rng.choice(list(BACKGROUNDS)),
            textured=rng.random() < 0.5,
            texture_seed=rng.getrandbits(31),
        )
        return scene, rng

    @staticmethod
    def _object(colour: str, shape: str, size: str, position: str, rng: random.Random) -> SceneObject:
        return SceneObject(
            colour, shape, size, position, rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)
        )

    def _record(self, split: str, index: int) -> ImageCaptionRecord:
        scene, rng = self._sample(split, index)
        return ImageCaptionRecord(
            image_id=f"scene-{split}-{index:05d}",
            image=SceneImage(scene, self.image_size),
            captions=describe_scene(scene, rng),
            split=split,
            label=scene.objects[0].label,
            origin=f"synthetic {split}[{index}]",
        )
