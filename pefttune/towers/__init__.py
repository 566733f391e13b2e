"""Towers: image and text encoders behind one structural interface (see :mod:`pefttune.towers.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefttune._lazy import lazy_attributes

# name -> the module that defines it; imported on first use (PEP 562).
_LAZY = {
    "BlockInfo": "pefttune.towers.base",
    "CLIPImageTower": "pefttune.towers.hf_clip",
    "CLIPTextTower": "pefttune.towers.hf_clip",
    "EfficientNetLite0Tower": "pefttune.towers.offline",
    "HFTextTower": "pefttune.towers.hf_text",
    "ImageTower": "pefttune.towers.base",
    "MiniLMTextTower": "pefttune.towers.offline",
    "OpenCLIPImageTower": "pefttune.towers.open_clip",
    "OpenCLIPTextTower": "pefttune.towers.open_clip",
    "QKVProjections": "pefttune.towers.base",
    "SiglipImageTower": "pefttune.towers.hf_siglip",
    "SiglipTextTower": "pefttune.towers.hf_siglip",
    "TextTower": "pefttune.towers.base",
    "TimmImageTower": "pefttune.towers.timm_image",
    "Tower": "pefttune.towers.base",
    "architecture_only": "pefttune.towers.base",
}

if TYPE_CHECKING:
    from pefttune.towers.base import (
        BlockInfo,
        ImageTower,
        QKVProjections,
        TextTower,
        Tower,
        architecture_only,
    )
    from pefttune.towers.hf_clip import CLIPImageTower, CLIPTextTower
    from pefttune.towers.hf_siglip import SiglipImageTower, SiglipTextTower
    from pefttune.towers.hf_text import HFTextTower
    from pefttune.towers.offline import EfficientNetLite0Tower, MiniLMTextTower
    from pefttune.towers.open_clip import OpenCLIPImageTower, OpenCLIPTextTower
    from pefttune.towers.timm_image import TimmImageTower

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "BlockInfo",
    "CLIPImageTower",
    "CLIPTextTower",
    "EfficientNetLite0Tower",
    "HFTextTower",
    "ImageTower",
    "MiniLMTextTower",
    "OpenCLIPImageTower",
    "OpenCLIPTextTower",
    "QKVProjections",
    "SiglipImageTower",
    "SiglipTextTower",
    "TextTower",
    "TimmImageTower",
    "Tower",
    "architecture_only",
]
