"""The tower interface: what every image or text encoder exposes to strategies.

A strategy never asks which model family a tower wraps. It asks the tower for its residual blocks
(:meth:`Tower.blocks`), each described by a :class:`BlockInfo` with references to the sub-modules a method
attaches to, and for the point where input tokens enter (:attr:`Tower.token_entry`). A new backbone
family is one subclass that answers these questions; every strategy then works on it.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torchvision.transforms import v2 as T

from pefttune.data.preprocessing import ImageTransform

if TYPE_CHECKING:
    from pefttune.losses import ContrastiveLoss

log = logging.getLogger(__name__)

Layout = Literal["tokens", "map"]
NormPosition = Literal["pre", "post", "none"]

_NO_WEIGHTS_ENV = "PEFTTUNE_NO_WEIGHTS"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence Hugging Face load reports (e.g. an unused pooler) while a tower loads its checkpoint."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Build every tower inside this context from its architecture alone, with random weights.

    Nothing is downloaded or read from a checkpoint; ``pefttune inspect --no-weights`` and the
    parameter-count tests rely on this.
    """
    previous = os.environ.get(_NO_WEIGHTS_ENV)
    os.environ[_NO_WEIGHTS_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_NO_WEIGHTS_ENV, None)
        else:
            os.environ[_NO_WEIGHTS_ENV] = previous


def checked_crop_scale(crop_scale: Sequence[float]) -> tuple[float, float]:
    """Validate the area range ``(min, max)`` of a random resized crop: ``0 < min <= max <= 1``."""
    values = tuple(float(v) for v in crop_scale)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise ValueError(
            f"crop_scale must be (min, max) fractions of the image area with 0 < min <= max <= 1, "
            f"got {tuple(crop_scale)!r} (the papers' Inception-style crop is (0.08, 1.0))"
        )
    return values[0], values[1]


CropFlipAugmentation = Literal["none", "crop_flip"]


def checked_crop_flip_augmentation(train_augmentation: str) -> CropFlipAugmentation:
    """Validate the ``train_augmentation`` of a tower that offers only ``none`` or ``crop_flip``."""
    if train_augmentation not in ("none", "crop_flip"):
        raise ValueError(f"train_augmentation must be 'none' or 'crop_flip', got {train_augmentation!r}")
    return train_augmentation  # type: ignore[return-value]  # narrowed by the check above


def random_crop_flip_transform(
    size: int,
    crop_scale: tuple[float, float],
    interpolation: T.InterpolationMode,
    mean: Sequence[float],
    std: Sequence[float],
) -> ImageTransform:
    """The ``crop_flip`` training transform: random resized crop, horizontal flip, scale to [0, 1], normalise.

    Args:
        size: side of the square crop the tower reads.
        crop_scale: area range ``(min, max)`` of the random resized crop (see :func:`checked_crop_scale`).
        interpolation: the resampling of the tower's own evaluation transform.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=crop_scale, interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def weights_enabled(pretrained: bool) -> bool:
    """Whether a tower asked for ``pretrained`` weights loads them (never inside ``architecture_only``)."""
    return pretrained and os.environ.get(_NO_WEIGHTS_ENV) != "1"


@dataclass(frozen=True)
class QKVProjections:
    """The query, key and value projections of one attention layer.

    Either ``query``/``key``/``value`` are three linears, or ``fused`` is one linear whose output features
    are ``[q; k; v]`` in three equal consecutive thirds (timm ViT's ``qkv``), or ``packed`` is an
    ``nn.MultiheadAttention`` that holds them as one parameter and applies them (and its output projection)
    without calling any module (OpenAI CLIP / open_clip blocks). Methods that need modules to wrap replace a
    packed attention with :class:`~pefttune.layers.split_qkv.SplitMultiheadAttention` first
    (:func:`~pefttune.layers.split_qkv.split_packed_attention`), after which the tower reports three linears.

    Attributes:
        names: module names relative to the tower, in the order (query, key, value), or (fused,), or
            (packed attention,).
    """

    names: tuple[str, ...]
    query: nn.Linear | None = None
    key: nn.Linear | None = None
    value: nn.Linear | None = None
    fused: nn.Linear | None = None
    packed: nn.MultiheadAttention | None = None

    @property
    def is_fused(self) -> bool:
        """True when q, k and v come from one linear."""
        return self.fused is not None

    @property
    def is_packed(self) -> bool:
        """True when q, k and v are a parameter of an ``nn.MultiheadAttention`` (no module to wrap)."""
        return self.packed is not None


@dataclass(frozen=True)
class BlockInfo:
    """One residual block of a tower, as strategies see it.

    Attributes:
        index: position of the block in the tower, from 0 (input side).
        name: the block's module name relative to the tower.
        module: the block; its output (a tensor, or a tuple whose first item is the hidden states) is the
            block output that serial adapters transform.
        layout: ``"tokens"`` for [B, N, D] outputs, ``"map"`` for [B, C, H, W] feature maps.
        width: D (tokens) or C (maps) of the block output.
        norm_position: ``"pre"`` (LayerNorm before each sub-layer, as ViT and CLIP), ``"post"`` (after the
            residual add, as BERT) or ``"none"`` (convolutional blocks).
        attention_output: for transformer blocks, the module whose output is the attention branch just
            before the residual add (a tensor [B, N, D]); adapters on the attention output hook it.
        mlp_output: likewise for the MLP branch.
        qkv: the block's query/key/value projections.
    """

    index: int
    name: str
    module: nn.Module
    layout: Layout
    width: int
    norm_position: NormPosition
    attention_output: nn.Module | None = None
    mlp_output: nn.Module | None = None
    qkv: QKVProjections | None = None

    @property
    def is_transformer(self) -> bool:
        """True when the block has attention and MLP sub-layers."""
        return self.attention_output is not None and self.mlp_output is not None


class Tower(nn.Module, abc.ABC):
    """Base class of image and text towers.

    A tower is a backbone (``self.model``) with a pooled output of width :attr:`feature_width` and a
    projection (``self.projection``) to the shared embedding width :attr:`embed_dim`. Its forward returns
    projected, *unnormalised* embeddings.

    Subclasses implement :meth:`features`, :meth:`blocks` and, where input tokens exist,
    :attr:`token_entry`. Parameter names under ``projection`` form the ``head`` group.

    Attributes:
        modality: ``"image"`` or ``"text"``.
        pretrained_logit_scale: the logit scale (not its log) that came with the checkpoint, for towers of
            a dual encoder (CLIP, SigLIP); ``None`` otherwise.
        pretrained_logit_bias: the logit bias that came with a sigmoid-loss checkpoint (SigLIP); ``None``
            otherwise.
    """

    modality: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.locked = False
        self.pretrained_logit_scale: float | None = None
        self.pretrained_logit_bias: float | None = None
        self.gradient_checkpointing = False
        self._blocks: list[BlockInfo] | None = None

    # -- what subclasses provide -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def feature_width(self) -> int:
        """Width of the pooled backbone features (before the projection)."""

    @abc.abstractmethod
    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, feature_width]."""

    @abc.abstractmethod
    def _discover_blocks(self) -> list[BlockInfo]:
        """Find the backbone's residual blocks (called once by :meth:`blocks`)."""

    @property
    def token_entry(self) -> nn.Module | None:
        """The module whose output is the token sequence entering the first block, or ``None`` (CNN).

        For image towers its output is [B, N, D] (patch tokens with positions; prompts are appended to it).
        For text towers it is the token-embedding table: its output [B, L, D] holds the embeddings of
        ``input_ids``, and prompt slots (see :meth:`TextTower.set_prompt_slots`) are overwritten there.
        """
        return None

    def preferred_loss(self) -> ContrastiveLoss | None:
        """The loss the checkpoint was trained with, when its logit scale (and bias) only make sense with it.

        SigLIP towers return :class:`~pefttune.losses.SigLIPLoss`: a config that names no loss then trains
        with it (before the strategy's default), starting from the checkpoint's scale and bias. CLIP-style
        towers return ``None`` (their InfoNCE scale suits every softmax loss the strategies pick).
        """
        return None

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them.

        Implementations use non-reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=False)``):
        the reentrant form silently drops the gradients of parameters inside a block (adapters, LoRA) when
        the block's input does not require grad, which is the case in a frozen backbone.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement gradient checkpointing")

    # -- shared behaviour --------------------------------------------------------------------------
    def blocks(self) -> list[BlockInfo]:
        """The ordered residual blocks (computed once, then cached)."""
        if self._blocks is None:
            self._blocks = self._discover_blocks()
            if not self._blocks:
                raise ValueError(f"{type(self).__name__}: found no residual blocks in the backbone")
        return self._blocks

    def refresh_blocks(self) -> None:
        """Forget the cached block descriptions (after a strategy replaced modules they point to)."""
        self._blocks = None

    @property
    def embed_dim(self) -> int:
        """Width of the projected embedding."""
        projection = self.projection
        if isinstance(projection, nn.Linear):
            return projection.out_features
        return self.feature_width

    def lock(self) -> None:
        """Freeze the whole tower (projection included), keep it in eval mode and run it without grad."""
        self.locked = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Tower:
        """Set training mode; a locked tower stays in eval mode (no dropout, frozen BatchNorm statistics)."""
        super().train(mode and not self.locked)
        return self

    def embed(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised embeddings [B, embed_dim]; without grad when the tower is locked."""
        context = torch.no_grad() if self.locked else contextlib.nullcontext()
        with context:
            return self.projection(self.features(*inputs))

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters that require grad."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def relative_name(self, module: nn.Module) -> str:
        """The name of ``module`` relative to this tower."""
        for name, candidate in self.named_modules():
            if candidate is module:
                return name
        raise KeyError(f"module {type(module).__name__} is not part of {type(self).__name__}")


class ImageTower(Tower):
    """A tower over images; owns its image transforms."""

    modality = "image"

    @abc.abstractmethod
    def image_transform(self, train: bool) -> ImageTransform:
        """PIL RGB image -> tensor [3, H, W] (training augmentation when ``train``)."""

    @property
    def train_transform_is_deterministic(self) -> bool:
        """True when training images go through no random augmentation."""
        return False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image embeddings [B, embed_dim]."""
        return self.embed(pixel_values)


class TextTower(Tower):
    """A tower over token sequences; owns its tokenizer.

    Prompt slots: a strategy that learns input-level text context (APEX) calls :meth:`set_prompt_slots`.
    The tokenizer then inserts those placeholder ids right after the first (start) token of every caption,
    and the strategy overwrites the slot embeddings at the output of :attr:`token_entry`.

    Attributes:
        pad_to_max_length: pad every caption to ``max_length`` (towers trained that way and pooling the last
            position, as SigLIP) instead of to the longest caption of the batch.
    """

    modality = "text"
    pad_to_max_length: bool = False

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.prompt_slot_ids: tuple[int, ...] = ()

    @property
    @abc.abstractmethod
    def tokenizer(self):  # noqa: ANN201 - a Hugging Face tokenizer of any class
        """The tokenizer (loaded lazily, so architecture-only towers never need one)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised text embeddings [B, embed_dim]."""
        return self.embed(input_ids, attention_mask)

    def set_prompt_slots(self, slot_ids: list[int]) -> None:
        """Insert ``slot_ids`` after the start token of every tokenized text."""
        self.prompt_slot_ids = tuple(int(i) for i in slot_ids)

    @property
    def num_prompt_slots(self) -> int:
        """How many placeholder tokens follow the start token."""
        return len(self.prompt_slot_ids)

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [B, L] of ``texts``, truncated to ``max_length``, before prompt slots.

        Padded to the longest text, or to ``max_length`` when :attr:`pad_to_max_length`. The default calls a
        Hugging Face tokenizer; towers with another tokenizer override this.
        """
        encoded = self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return encoded["input_ids"], encoded["attention_mask"]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize captions: padded to the longest, truncated to ``max_length`` (prompt slots included)."""
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a list of strings, not a single string")
        input_ids, attention_mask = self.encode_batch(list(texts), self.max_length - self.num_prompt_slots)
        if self.num_prompt_slots:
            slots = torch.tensor(self.prompt_slot_ids, dtype=input_ids.dtype).expand(len(texts), -1)
            input_ids = torch.cat([input_ids[:, :1], slots, input_ids[:, 1:]], dim=1)
            attention_mask = torch.cat(
                [attention_mask[:, :1], torch.ones_like(slots), attention_mask[:, 1:]], dim=1
            )
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def set_hf_gradient_checkpointing(model: nn.Module, enable: bool) -> None:
    """Switch Hugging Face layers' own gradient checkpointing, non-reentrant, on any sub-module of a model.

    ``PreTrainedModel.gradient_checkpointing_enable`` needs the top-level model; towers keep only its
    transformer, so this sets what it sets (the flag and the checkpoint function) on every module that has
    a ``gradient_checkpointing`` flag.

    Raises:
        ValueError: when ``enable`` and no layer supports checkpointing.
    """
    from torch.utils.checkpoint import checkpoint

    from pefttune.layers.hooks import CheckpointWithOutputTransforms

    function = functools.partial(checkpoint, use_reentrant=False)
    found = False
    for module in model.modules():
        if isinstance(getattr(module, "gradient_checkpointing", None), bool):
            # Strategies' output transforms on the layer (forward hooks, which transformers leaves outside
            # its checkpoint) are recomputed with it rather than kept.
            module._gradient_checkpointing_func = CheckpointWithOutputTransforms(module, function)
            module.gradient_checkpointing = enable
            found = True
    if enable and not found:
        raise ValueError(f"{type(model).__name__} has no layer that supports gradient checkpointing")


def pool_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Literal["cls", "mean", "eos"]
) -> torch.Tensor:
    """Pool token states [B, L, D] to [B, D].

    ``cls`` takes the first token, ``mean`` averages attended tokens, ``eos`` takes the last attended
    token (CLIP's end-of-text token: padding always follows it).
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if pooling == "eos":
        last = attention_mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}: expected 'cls', 'mean' or 'eos'")


def make_projection(feature_width: int, embed_dim: int | None, bias: bool = False) -> nn.Module:
    """A linear projection to ``embed_dim``, or the identity when ``embed_dim`` is None."""
    if embed_dim is None:
        return nn.Identity()
    projection = nn.Linear(feature_width, embed_dim, bias=bias)
    nn.init.normal_(projection.weight, std=feature_width**-0.5)
    return projection
