"""Tiny towers and models that build offline in well under a second, for tests, notebooks and examples.

Like Lightning's ``demos.boring_classes``: real tower classes on tiny architectures with random weights.
"""

from __future__ import annotations

from collections.abc import Callable

from pefttune.towers import (
    CLIPImageTower,
    CLIPTextTower,
    HFTextTower,
    ImageTower,
    OpenCLIPImageTower,
    OpenCLIPTextTower,
    SiglipImageTower,
    SiglipTextTower,
    TextTower,
    TimmImageTower,
)


def tiny_vit(embed_dim: int | None = 24, image_size: int = 32) -> TimmImageTower:
    """Timm's ``test_vit`` (6 pre-LN blocks, width 64), random weights.

    Evaluation resizes straight to ``image_size`` (``crop_pct=1``): test images are drawn at that size.
    """
    return TimmImageTower(
        "test_vit", pretrained=False, embed_dim=embed_dim, image_size=image_size, crop_pct=1.0
    )


def tiny_cnn(embed_dim: int | None = 24, image_size: int = 32) -> TimmImageTower:
    """Timm's ``test_efficientnet`` (a convolutional tower with feature-map blocks), random weights.

    Evaluation resizes straight to ``image_size`` (``crop_pct=1``): test images are drawn at that size.
    """
    return TimmImageTower(
        "test_efficientnet", pretrained=False, embed_dim=embed_dim, image_size=image_size, crop_pct=1.0
    )


def tiny_bert(embed_dim: int | None = 24, max_length: int = 16) -> HFTextTower:
    """A 2-layer, 32-wide post-LN BERT with the packaged WordPiece tokenizer, random weights."""
    return HFTextTower("pefttune/tiny-bert", pretrained=False, embed_dim=embed_dim, max_length=max_length)


def tiny_clip(max_length: int = 16) -> tuple[CLIPImageTower, CLIPTextTower]:
    """Both towers of a tiny random ``CLIPModel`` (2 blocks each, projection width 24, 32 px images)."""
    return (
        CLIPImageTower("pefttune/tiny-clip", pretrained=False),
        CLIPTextTower("pefttune/tiny-clip", pretrained=False, max_length=max_length),
    )


def tiny_open_clip(timm_trunk: bool = False) -> tuple[OpenCLIPImageTower, OpenCLIPTextTower]:
    """Both towers of a tiny random open_clip model.

    Args:
        timm_trunk: False: OpenAI-style ``VisionTransformer`` and causal text (``nn.MultiheadAttention``
            blocks, 2 each, 32 px). True: a SigLIP-style model, timm's ``test_vit`` trunk (160 px) with a
            bidirectional text tower pooling the last position and a logit bias (sigmoid loss).
    """
    name = "pefttune-tiny-openclip-timm" if timm_trunk else "pefttune-tiny-openclip"
    return OpenCLIPImageTower(name), OpenCLIPTextTower(name)


def tiny_siglip(max_length: int = 16) -> tuple[SiglipImageTower, SiglipTextTower]:
    """Both towers of a tiny random Hugging Face ``SiglipModel`` (2 blocks each, width 24, 32 px images)."""
    return (
        SiglipImageTower("pefttune/tiny-siglip", pretrained=False),
        SiglipTextTower("pefttune/tiny-siglip", pretrained=False, max_length=max_length),
    )


def tiny_tower_config() -> dict[str, dict]:
    """``tiny_vit()`` and ``tiny_bert()`` as LightningCLI ``class_path`` specs of a config's model section.

    Returns:
        ``{"image_tower": {...}, "text_tower": {...}}``, ready to merge into ``model.init_args`` (a fresh
        dict on every call, so callers may modify it).
    """
    return {
        "image_tower": {
            "class_path": "pefttune.towers.TimmImageTower",
            "init_args": {
                "model_name": "test_vit",
                "pretrained": False,
                "embed_dim": 24,
                "image_size": 32,
                "crop_pct": 1.0,
            },
        },
        "text_tower": {
            "class_path": "pefttune.towers.HFTextTower",
            "init_args": {
                "model_name": "pefttune/tiny-bert",
                "pretrained": False,
                "embed_dim": 24,
                "max_length": 16,
            },
        },
    }


TINY_TOWER_PAIRS: dict[str, Callable[[], tuple[ImageTower, TextTower]]] = {
    "vit+bert": lambda: (tiny_vit(), tiny_bert()),
    "cnn+bert": lambda: (tiny_cnn(), tiny_bert()),
    "clip": tiny_clip,
    "openclip": tiny_open_clip,
    "openclip-timm": lambda: tiny_open_clip(timm_trunk=True),
    "siglip": tiny_siglip,
}
