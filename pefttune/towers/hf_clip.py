"""The two towers of a Hugging Face ``CLIPModel``, each keeping CLIP's own projection.

Each half is built alone (``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``), so an image
tower never keeps the text tower's weights alive; the pair's logit scale is read from the checkpoint file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Literal, TypeVar

import torch
from torch import nn
from torchvision.transforms import v2 as T
from transformers import (
    CLIPConfig,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from pefttune.data.preprocessing import ImageTransform
from pefttune.towers._hf import ClipLayoutEncoder, ClipLayoutVisionEncoder, LazyTokenizer
from pefttune.towers.architectures import architecture_config
from pefttune.towers.base import (
    ImageTower,
    TextTower,
    checked_crop_flip_augmentation,
    checked_crop_scale,
    pool_tokens,
    quiet_transformers,
    random_crop_flip_transform,
    weights_enabled,
)

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIPConfig's logit_scale_init_value: log(1 / 0.07).
_CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SHARD_INDEX = "model.safetensors.index.json"


def _checkpoint_file(name: str, key: str) -> str | None:
    """The local file of a Hugging Face checkpoint that holds tensor ``key`` (Hub cache or directory)."""
    from transformers.utils import cached_file

    def locate(filename: str) -> str | None:
        if os.path.isdir(name):
            path = os.path.join(name, filename)
            return path if os.path.isfile(path) else None
        return cached_file(name, filename, _raise_exceptions_for_missing_entries=False)

    index = locate(_SHARD_INDEX)
    if index is not None:
        with open(index, encoding="utf-8") as handle:
            shard = json.load(handle).get("weight_map", {}).get(key)
        return locate(shard) if shard else None
    for filename in _WEIGHT_FILES:
        path = locate(filename)
        if path is not None:
            return path
    return None


def checkpoint_scalar(name: str, keys: tuple[str, ...]) -> float | None:
    """Read one scalar (e.g. ``logit_scale``) from a Hugging Face checkpoint without building the model.

    A tower built from one half of a dual encoder (``CLIPVisionModelWithProjection``) does not load the
    pair's logit scale and bias; they are read here from the checkpoint file, tensor by tensor.

    Args:
        name: the Hub id or local directory the tower loaded.
        keys: candidate tensor names, first found wins (``logit_scale``, ``model.logit_scale``).

    Returns:
        The value, or ``None`` when the checkpoint has no such tensor.
    """
    for key in keys:
        path = _checkpoint_file(name, key)
        if path is None:
            continue
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                if key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    return float(handle.get_tensor(key).float().reshape(-1)[0])
            continue
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if key in state:
            return float(state[key].float().reshape(-1)[0])
    return None


def pretrained_logit_scale(name: str, loaded: bool, init_value: float) -> float:
    """The scale (not its log) of a CLIP checkpoint, or ``exp(init_value)`` for an architecture-only tower."""
    if loaded:
        value = checkpoint_scalar(name, ("logit_scale",))
        if value is not None:
            return math.exp(value)
        log.warning("%s: the checkpoint holds no logit_scale; using the config's initial value", name)
    return math.exp(init_value)


def _clip_config(name: str) -> CLIPConfig:
    config = architecture_config(name)
    if not isinstance(config, CLIPConfig):
        raise ValueError(f"{name!r} is not a CLIP architecture (got {type(config).__name__})")
    # The halves read their own projection width; CLIPConfig keeps it at the top level.
    config.vision_config.projection_dim = config.projection_dim
    config.text_config.projection_dim = config.projection_dim
    return config


HalfModel = TypeVar("HalfModel", CLIPVisionModelWithProjection, CLIPTextModelWithProjection)


def _build_clip_half(half_class: type[HalfModel], name: str, loaded: bool) -> tuple[HalfModel, float]:
    """One half of a ``CLIPModel`` (checkpoint or architecture-only) and the pair's pretrained logit scale.

    Args:
        half_class: ``CLIPVisionModelWithProjection`` or ``CLIPTextModelWithProjection``.
        name: the Hub id, local directory or architecture name.
        loaded: load the checkpoint's weights (else random weights from the architecture's config).

    Returns:
        The half (in eval mode when loaded, as ``from_pretrained`` returns it) and the scale (not its log).
    """
    with quiet_transformers():
        if loaded:
            half = half_class.from_pretrained(name)
            init = _CLIP_LOGIT_SCALE_INIT  # only used when the checkpoint has no logit_scale
        else:
            config = _clip_config(name)
            is_vision = half_class is CLIPVisionModelWithProjection
            half = half_class(config.vision_config if is_vision else config.text_config)
            init = config.logit_scale_init_value
    return half, pretrained_logit_scale(name, loaded, init)


class CLIPImageTower(ClipLayoutVisionEncoder, ImageTower):
    """The vision tower of a Hugging Face ``CLIPModel`` (CLS token -> post-LayerNorm -> visual projection).

    Args:
        model_name: a Hub id such as ``openai/clip-vit-base-patch16`` or a local directory.
        pretrained: load the checkpoint; False builds the architecture with random weights.
        train_augmentation: ``none`` or ``crop_flip`` (random resized crop and flip).
        crop_scale: area range ``(min, max)`` of the random resized crop, as fractions of the image; the
            default (0.5, 1.0) is mild, CLIP-LoRA's and Dassl's (APEX) is (0.08, 1.0).
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
        half, self.pretrained_logit_scale = _build_clip_half(
            CLIPVisionModelWithProjection, model_name, loaded
        )
        self.model = half.vision_model.train()  # from_pretrained returns eval mode
        self.projection = half.visual_projection
        self.image_size = int(half.config.image_size)
        self.train_augmentation = checked_crop_flip_augmentation(train_augmentation)
        self.crop_scale = checked_crop_scale(crop_scale)
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def image_transform(self, train: bool) -> ImageTransform:
        """CLIP's preprocessing: bicubic resize of the short side, centre crop, CLIP mean/std."""
        size, bicubic = self.image_size, T.InterpolationMode.BICUBIC
        if train and self.train_augmentation == "crop_flip":
            return random_crop_flip_transform(size, self.crop_scale, bicubic, CLIP_MEAN, CLIP_STD)
        return T.Compose(
            [
                T.ToImage(),
                T.Resize(size, interpolation=bicubic),
                T.CenterCrop(size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )


class CLIPTextTower(ClipLayoutEncoder, LazyTokenizer, TextTower):
    """The text tower of a Hugging Face ``CLIPModel`` (end-of-text token -> final LayerNorm -> projection).

    Args:
        model_name: a Hub id such as ``openai/clip-vit-base-patch16`` or a local directory.
        pretrained: load the checkpoint; False builds the architecture with random weights.
        max_length: maximum tokens per caption (CLIP: 77).
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        max_length: int = 77,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(max_length=max_length)
        self.model_name = model_name
        self._pretrained = weights_enabled(pretrained)
        half, self.pretrained_logit_scale = _build_clip_half(
            CLIPTextModelWithProjection, model_name, self._pretrained
        )
        self.model = half.text_model.train()  # from_pretrained returns eval mode
        self.projection = half.text_projection
        self.tokenizer_name = model_name  # CLIP's BPE tokenizer ships with the checkpoint
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm state of the last attended (end-of-text) token [B, width]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_tokens(hidden, attention_mask, "eos")

    @property
    def token_entry(self) -> nn.Module:
        """The token-embedding table."""
        return self.model.embeddings.token_embedding
