"""Learnable prompts: deep visual prompt tokens, pixel-space padding prompts and text context vectors.

Every module here is attached to a tower through :mod:`pefttune.layers.hooks` and has a ``mode``:

* ``"learned"``: the module applies its learnable prompts (training, and the adapted model at evaluation);
* ``"off"``: the module passes its input through unchanged, so the tower computes exactly what it computed
  before the prompts were attached (the frozen reference of APEX's ensemble);
* ``"reference"``: the module applies a fixed, never-trained random copy of its prompts, kept as a buffer
  (APEX's official reference branch; only for modules built with ``reference=True``).

The modes of the modules that belong together (a tower's deep prompts: append, replace, strip) must be set
together; :class:`~pefttune.strategies.apex.APEX` does that with one context manager.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PromptMode = Literal["learned", "off", "reference"]
PROMPT_MODES: tuple[str, ...] = ("learned", "off", "reference")


class _Switchable(nn.Module):
    """A module whose effect can be switched off or replaced by a fixed random reference."""

    def __init__(self) -> None:
        super().__init__()
        self._mode: PromptMode = "learned"

    @property
    def mode(self) -> PromptMode:
        """``learned``, ``off`` or ``reference``."""
        return self._mode

    @mode.setter
    def mode(self, value: PromptMode) -> None:
        if value not in PROMPT_MODES:
            raise ValueError(f"mode must be one of {PROMPT_MODES}, got {value!r}")
        if value == "reference" and not self.has_reference:
            raise ValueError(f"{type(self).__name__} was built without reference prompts (reference=False)")
        self._mode = value

    @property
    def has_reference(self) -> bool:
        """Whether the module holds a fixed random reference copy of its prompts."""
        return False

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"mode={self._mode!r}"


class _PromptTensor(_Switchable):
    """Holds a learnable prompt tensor ``prompts`` and, optionally, a frozen random ``reference`` copy."""

    def __init__(self, shape: tuple[int, ...], init_std: float, reference: bool) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(shape))
        nn.init.normal_(self.prompts, std=init_std)
        if reference:
            # Persistent, so a checkpoint reproduces the same reference branch (the official code saves it).
            self.register_buffer("reference", torch.randn(shape) * init_std, persistent=True)
        else:
            self.reference = None

    @property
    def has_reference(self) -> bool:
        """Whether a reference copy exists."""
        return self.reference is not None

    def current(self) -> torch.Tensor | None:
        """The prompts of the current mode (None when off)."""
        if self._mode == "off":
            return None
        if self._mode == "reference":
            return self.reference
        return self.prompts


class AppendPromptTokens(_PromptTensor):
    """Appends ``num_tokens`` learnable tokens after the token sequence [B, N, D] -> [B, N + n, D].

    The first layer of deep visual prompt tuning (VPT-deep / IVLP): the tokens are appended after the
    patch tokens, once positions have been added, so they carry no positional embedding.

    Args:
        num_tokens: prompt tokens n.
        width: token width D.
        init_std: standard deviation of the normal initialisation (APEX: 0.02).
        reference: also keep a fixed random copy for ``mode="reference"``.
    """

    def __init__(self, num_tokens: int, width: int, init_std: float = 0.02, reference: bool = False) -> None:
        super().__init__((num_tokens, width), init_std, reference)
        self.num_tokens = num_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append the prompts to every sequence of the batch."""
        prompts = self.current()
        if prompts is None:
            return tokens
        prompts = prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens, prompts], dim=1)


class ReplacePromptTokens(AppendPromptTokens):
    """Replaces the last ``num_tokens`` tokens of the sequence with fresh learnable tokens.

    Deeper layers of deep visual prompt tuning: before block i the previous block's prompt outputs are
    dropped and this block's own prompts take their place.
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Swap the trailing prompt tokens for this layer's prompts."""
        prompts = self.current()
        if prompts is None:
            return tokens
        prompts = prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens[:, : -self.num_tokens], prompts], dim=1)


class StripPromptTokens(_Switchable):
    """Removes the trailing ``num_tokens`` prompt tokens after the last block.

    Pooling and the final norm then see the original sequence: CLS pooling would ignore the prompts anyway,
    mean pooling would not. Its mode must follow the prompts' mode (nothing to strip when they are off).
    """

    def __init__(self, num_tokens: int, reference: bool = False) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self._reference = reference

    @property
    def has_reference(self) -> bool:
        """Follows the prompts it strips."""
        return self._reference

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop the trailing prompt tokens."""
        if self._mode == "off":
            return tokens
        return tokens[:, : -self.num_tokens]


class PixelPaddingPrompt(_Switchable):
    """A learnable border of ``pad`` pixels around a square image, added to the input pixels.

    Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale Models" (arXiv 2203.17274, 2022): the
    prompt is a frame of width ``pad`` whose values are added to the (normalised) image; the interior is
    untouched. It is the token-free counterpart of deep visual prompts for convolutional towers.

    The frame is stored as four strips (top and bottom ``[C, pad, size]``, left and right
    ``[C, size - 2 pad, pad]``), so the parameter count is exactly the number of pixels it touches:
    ``C * (2 * pad * size + 2 * pad * (size - 2 * pad))``, 69,840 for size 224 and pad 30 (the paper's
    default).

    Args:
        image_size: side of the square input images.
        pad: border width in pixels.
        init_std: standard deviation of the normal initialisation. Bahng et al. draw from N(0, 1); the
            default 0.02 starts close to the frozen model, as APEX's token prompts do.
        reference: also keep a fixed random frame (a buffer) for ``mode="reference"``.
        channels: image channels.
    """

    def __init__(
        self,
        image_size: int,
        pad: int = 30,
        init_std: float = 0.02,
        reference: bool = False,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if pad < 1 or 2 * pad >= image_size:
            raise ValueError(f"pad must be in [1, image_size / 2), got pad={pad} for image_size={image_size}")
        inner = image_size - 2 * pad
        self.image_size = image_size
        self.pad = pad
        self.top = nn.Parameter(torch.randn(channels, pad, image_size) * init_std)
        self.bottom = nn.Parameter(torch.randn(channels, pad, image_size) * init_std)
        self.left = nn.Parameter(torch.randn(channels, inner, pad) * init_std)
        self.right = nn.Parameter(torch.randn(channels, inner, pad) * init_std)
        if reference:
            strips = (torch.randn_like(p) * init_std for p in self._strips())
            # Persistent, so a checkpoint reproduces the same reference branch.
            self.register_buffer("reference", self._frame(*strips), persistent=True)
        else:
            self.reference = None

    @property
    def has_reference(self) -> bool:
        """Whether a reference frame exists."""
        return self.reference is not None

    def _strips(self) -> tuple[torch.Tensor, ...]:
        return self.top, self.bottom, self.left, self.right

    def _frame(
        self, top: torch.Tensor, bottom: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> torch.Tensor:
        inner = self.image_size - 2 * self.pad
        centre = torch.zeros(top.shape[0], inner, inner, dtype=top.dtype, device=top.device)
        middle = torch.cat([left, centre, right], dim=2)
        return torch.cat([top, middle, bottom], dim=1)

    def frame(self) -> torch.Tensor:
        """The full learnable prompt [C, size, size] (zeros inside the border)."""
        return self._frame(*self._strips())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Add the border prompt to images [B, C, size, size]."""
        if self._mode == "off":
            return pixel_values
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"the pixel padding prompt was built for {self.image_size}x{self.image_size} images, got "
                f"{tuple(pixel_values.shape[-2:])}; set the image tower's image_size to the input size"
            )
        frame = self.reference if self._mode == "reference" else self.frame()
        return pixel_values + frame.to(pixel_values.dtype)

    @staticmethod
    def num_parameters(image_size: int, pad: int, channels: int = 3) -> int:
        """Parameters of a padding prompt: ``C * (2 * pad * size + 2 * pad * (size - 2 * pad))``."""
        return channels * (2 * pad * image_size + 2 * pad * (image_size - 2 * pad))


class TextContext(_Switchable):
    """Learnable context vectors written over the prompt-slot positions 1..n of the token embeddings.

    The text tower's tokenizer inserts n placeholder ids right after the start token
    (:meth:`~pefttune.towers.base.TextTower.set_prompt_slots`); this module, an output transform of the
    token-embedding table, overwrites their embeddings [B, L, D] with the learnable vectors. With the module
    off, the placeholders keep their own word embeddings (APEX: the words "a photo").

    Args:
        vectors: initial context vectors [n, D] (e.g. the embeddings of the placeholder words).
    """

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        if vectors.ndim != 2 or vectors.shape[0] < 1:
            raise ValueError(f"context vectors must have shape [n >= 1, D], got {tuple(vectors.shape)}")
        self.vectors = nn.Parameter(vectors.detach().clone().float())

    @property
    def num_tokens(self) -> int:
        """Context length n."""
        return int(self.vectors.shape[0])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings at positions 1..n with the context vectors."""
        if self._mode == "off":
            return embeddings
        n = self.num_tokens
        if embeddings.shape[1] < n + 1:
            raise ValueError(
                f"a text of {embeddings.shape[1]} tokens has no room for {n} context slots after its start"
            )
        context = self.vectors.to(embeddings.dtype).expand(embeddings.shape[0], -1, -1)
        return torch.cat([embeddings[:, :1], context, embeddings[:, 1 + n :]], dim=1)
