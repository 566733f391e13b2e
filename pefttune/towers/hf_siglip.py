"""The two towers of a Hugging Face ``SiglipModel`` (SigLIP), each built alone from its half.

SigLIP (Zhai et al., ICCV 2023) trains with the pairwise sigmoid loss, a learned logit scale and a learned
logit bias. Both towers carry the checkpoint's scale and bias and declare
:class:`~pefttune.losses.SigLIPLoss` as their preferred loss, so a config that names no loss trains with the
sigmoid loss from the checkpoint's scale and bias.

* Image: ``SiglipVisionModel``; features are its multi-head attention pooling head's output (no class
  token, no separate projection: the pooled width is the shared width). Preprocessing as SigLIP's image
  processor: bicubic resize of the whole image to the square input size (no crop), mean = std = 0.5.
* Text: ``SiglipTextModel``; the final-LayerNorm state of the *last position* goes through the text head
  (a linear, the tower's projection). SigLIP was trained on captions padded to 64 tokens without an
  attention mask, so the tower pads every caption to ``max_length`` and passes no mask.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torchvision.transforms import v2 as T
from transformers import SiglipConfig, SiglipTextModel, SiglipVisionModel

from pefttune.data.preprocessing import ImageTransform
from pefttune.losses import ContrastiveLoss, SigLIPLoss
from pefttune.towers._hf import ClipLayoutEncoder, ClipLayoutVisionEncoder, LazyTokenizer
from pefttune.towers.architectures import architecture_config
from pefttune.towers.base import (
    ImageTower,
    TextTower,
    Tower,
    checked_crop_flip_augmentation,
    checked_crop_scale,
    quiet_transformers,
    random_crop_flip_transform,
    weights_enabled,
)
from pefttune.towers.hf_clip import checkpoint_scalar

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# The paper's initialisation, used by architecture-only towers (no checkpoint to read them from).
SIGLIP_INIT_SCALE = 10.0
SIGLIP_INIT_BIAS = -10.0


def _siglip_config(name: str) -> SiglipConfig:
    config = architecture_config(name)
    if not isinstance(config, SiglipConfig):
        raise ValueError(f"{name!r} is not a SigLIP architecture (got {type(config).__name__})")
    return config


def _carry_scale_and_bias(tower: Tower, name: str, loaded: bool) -> None:
    """Set the tower's pretrained scale and bias from the checkpoint (or SigLIP's initial values)."""
    scale, bias = SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS
    if loaded:
        log_scale = checkpoint_scalar(name, ("logit_scale",))
        checkpoint_bias = checkpoint_scalar(name, ("logit_bias",))
        if log_scale is None or checkpoint_bias is None:
            raise ValueError(
                f"{name}: the checkpoint holds no logit_scale/logit_bias; is it a SiglipModel checkpoint?"
            )
        scale, bias = math.exp(log_scale), checkpoint_bias
    tower.pretrained_logit_scale = scale
    tower.pretrained_logit_bias = bias


class SiglipImageTower(ClipLayoutVisionEncoder, ImageTower):
    """The vision tower of a Hugging Face ``SiglipModel`` (attention-pooled features, no projection).

    Args:
        model_name: a Hub id such as ``google/siglip-base-patch16-224`` or a local directory.
        pretrained: load the checkpoint; False builds the architecture with random weights.
        train_augmentation: ``none`` or ``crop_flip`` (random resized crop and flip).
        crop_scale: area range ``(min, max)`` of the random resized crop.
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        train_augmentation: Literal["none", "crop_flip"] = "none",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        loaded = weights_enabled(pretrained)
        with quiet_transformers():
            if loaded:
                self.model = SiglipVisionModel.from_pretrained(model_name)
            else:
                self.model = SiglipVisionModel(_siglip_config(model_name).vision_config)
        self.model.train()  # from_pretrained returns eval mode
        if not self.model.config.vision_use_head:
            raise ValueError(f"{model_name}: SigLIP vision towers without the pooling head are not supported")
        self.projection = nn.Identity()
        _carry_scale_and_bias(self, model_name, loaded)
        self.image_size = int(self.model.config.image_size)
        self.train_augmentation = checked_crop_flip_augmentation(train_augmentation)
        self.crop_scale = checked_crop_scale(crop_scale)
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def preferred_loss(self) -> ContrastiveLoss:
        """SigLIP's pairwise sigmoid loss."""
        return SigLIPLoss()

    def image_transform(self, train: bool) -> ImageTransform:
        """SigLIP's preprocessing: bicubic resize of the whole image to the input size, mean = std = 0.5."""
        size, bicubic = self.image_size, T.InterpolationMode.BICUBIC
        if train and self.train_augmentation == "crop_flip":
            return random_crop_flip_transform(size, self.crop_scale, bicubic, SIGLIP_MEAN, SIGLIP_STD)
        return T.Compose(
            [
                T.ToImage(),
                T.Resize((size, size), interpolation=bicubic),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(SIGLIP_MEAN, SIGLIP_STD),
            ]
        )


class SiglipTextTower(ClipLayoutEncoder, LazyTokenizer, TextTower):
    """The text tower of a Hugging Face ``SiglipModel`` (last position -> final LayerNorm -> head).

    Args:
        model_name: a Hub id such as ``google/siglip-base-patch16-224`` or a local directory.
        pretrained: load the checkpoint; False builds the architecture with random weights.
        max_length: every caption is padded (and truncated) to this many tokens (SigLIP: 64).
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).
    """

    pad_to_max_length = True

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        max_length: int = 64,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(max_length=max_length)
        self.model_name = model_name
        self._pretrained = weights_enabled(pretrained)
        with quiet_transformers():
            if self._pretrained:
                self.model = SiglipTextModel.from_pretrained(model_name)
            else:
                self.model = SiglipTextModel(_siglip_config(model_name).text_config)
        self.model.train()  # from_pretrained returns eval mode
        positions = int(self.model.config.max_position_embeddings)
        if max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the text tower's {positions} positions")
        # The text head is the tower's projection (group "head"); the backbone then ends at the last state.
        self.projection = self.model.head
        self.model.head = nn.Identity()
        _carry_scale_and_bias(self, model_name, self._pretrained)
        self.tokenizer_name = model_name  # SigLIP's SentencePiece tokenizer ships with the checkpoint
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def preferred_loss(self) -> ContrastiveLoss:
        """SigLIP's pairwise sigmoid loss."""
        return SigLIPLoss()

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm state of the last position [B, width] (no attention mask, as trained)."""
        if input_ids.shape[1] != self.max_length:
            raise ValueError(
                f"SigLIP text towers read captions padded to max_length={self.max_length} tokens (the last "
                f"position is pooled); got {input_ids.shape[1]}: tokenize with the tower's tokenize()"
            )
        return self.model(input_ids=input_ids).last_hidden_state[:, -1]

    @property
    def token_entry(self) -> nn.Module:
        """The token-embedding table."""
        return self.model.embeddings.token_embedding
