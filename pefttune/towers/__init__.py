"""Towers: image and text encoders behind one structural interface (see :mod:`pefttune.towers.base`)."""

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
