"""The two towers of a Hugging Face ``CLIPModel``, each keeping CLIP's own projection."""

from __future__ import annotations

import math
import threading
from typing import Literal

import torch
from torch import nn
from torchvision.transforms import v2 as T
from transformers import CLIPModel, PreTrainedTokenizerBase

from pefttune.data.preprocessing import ImageTransform
from pefttune.towers.architectures import architecture_config
from pefttune.towers.base import (
    BlockInfo,
    ImageTower,
    QKVProjections,
    TextTower,
    checked_crop_scale,
    pool_tokens,
    quiet_transformers,
    weights_enabled,
)
from pefttune.towers.hf_text import load_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_pending: dict[tuple[str, bool], tuple[CLIPModel, set[str]]] = {}
_pending_lock = threading.Lock()


def _take_half(name: str, pretrained: bool, half: str) -> CLIPModel:
    """Load a CLIPModel once for its two towers.

    The image and text towers of one model are built one after the other; the first loads the checkpoint
    and leaves it for the second. A half is never handed out twice, so two models built from the same
    name never share weights.
    """
    key = (name, pretrained)
    with _pending_lock:
        entry = _pending.get(key)
        if entry is not None and half not in entry[1]:
            model, taken = entry
            taken.add(half)
            if len(taken) == 2:
                del _pending[key]
            return model
        with quiet_transformers():
            model = CLIPModel.from_pretrained(name) if pretrained else CLIPModel(architecture_config(name))
        _pending[key] = (model, {half})
        return model


def _clip_blocks(layers: nn.ModuleList, prefix: str, width: int) -> list[BlockInfo]:
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


class CLIPImageTower(ImageTower):
    """The vision tower of a Hugging Face ``CLIPModel`` (CLS token -> post-LayerNorm -> visual projection).

    Args:
        model_name: a Hub id such as ``openai/clip-vit-base-patch16`` or a local directory.
        pretrained: load the checkpoint; False builds the architecture with random weights.
        train_augmentation: ``none`` or ``crop_flip`` (random resized crop and flip).
        crop_scale: area range ``(min, max)`` of the random resized crop, as fractions of the image; the
            default (0.5, 1.0) is mild, CLIP-LoRA's and Dassl's (APEX) is (0.08, 1.0).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        train_augmentation: Literal["none", "crop_flip"] = "none",
        crop_scale: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        super().__init__()
        self.model_name = model_name
        clip = _take_half(model_name, weights_enabled(pretrained), "vision")
        self.model = clip.vision_model.train()  # from_pretrained returns eval mode
        self.projection = clip.visual_projection
        self.pretrained_logit_scale = float(clip.logit_scale.detach().exp())
        self.image_size = int(clip.config.vision_config.image_size)
        if train_augmentation not in ("none", "crop_flip"):
            raise ValueError(f"train_augmentation must be 'none' or 'crop_flip', got {train_augmentation!r}")
        self.train_augmentation = train_augmentation
        self.crop_scale = checked_crop_scale(crop_scale)

    def image_transform(self, train: bool) -> ImageTransform:
        """CLIP's preprocessing: bicubic resize of the short side, centre crop, CLIP mean/std."""
        size = self.image_size
        steps: list[nn.Module] = [T.ToImage()]
        if train and self.train_augmentation == "crop_flip":
            steps += [
                T.RandomResizedCrop(size, scale=self.crop_scale, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
            ]
        else:
            steps += [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]
        return T.Compose(steps)

    @property
    def train_transform_is_deterministic(self) -> bool:
        """True without augmentation."""
        return self.train_augmentation == "none"

    @property
    def feature_width(self) -> int:
        """The vision transformer's width."""
        return int(self.model.config.hidden_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Post-LayerNorm CLS token [B, width]."""
        return self.model(pixel_values=pixel_values).pooler_output

    @property
    def token_entry(self) -> nn.Module:
        """The patch + position embedding module (its output enters ``pre_layrnorm``)."""
        return self.model.embeddings

    def _discover_blocks(self) -> list[BlockInfo]:
        return _clip_blocks(self.model.encoder.layers, "model.encoder.layers", self.feature_width)


class CLIPTextTower(TextTower):
    """The text tower of a Hugging Face ``CLIPModel`` (end-of-text token -> final LayerNorm -> projection).

    Args:
        model_name: a Hub id such as ``openai/clip-vit-base-patch16`` or a local directory.
        pretrained: load the checkpoint; False builds the architecture with random weights.
        max_length: maximum tokens per caption (CLIP: 77).
    """

    def __init__(self, model_name: str, pretrained: bool = True, max_length: int = 77) -> None:
        super().__init__(max_length=max_length)
        self.model_name = model_name
        self._pretrained = weights_enabled(pretrained)
        clip = _take_half(model_name, self._pretrained, "text")
        self.model = clip.text_model.train()  # from_pretrained returns eval mode
        self.projection = clip.text_projection
        self.pretrained_logit_scale = float(math.exp(clip.logit_scale.item()))
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """CLIP's BPE tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name, fallback_allowed=not self._pretrained)
        return self._tokenizer

    @property
    def feature_width(self) -> int:
        """The text transformer's width."""
        return int(self.model.config.hidden_size)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm state of the last attended (end-of-text) token [B, width]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_tokens(hidden, attention_mask, "eos")

    @property
    def token_entry(self) -> nn.Module:
        """The token-embedding table."""
        return self.model.embeddings.token_embedding

    def _discover_blocks(self) -> list[BlockInfo]:
        return _clip_blocks(self.model.encoder.layers, "model.encoder.layers", self.feature_width)
