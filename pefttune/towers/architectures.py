"""Architecture-only configs for the paper backbones, so towers build with no download.

``timm`` builds any architecture by name with ``pretrained=False``. Hugging Face models need a config;
these are the published configs of the checkpoints the paper settings use (and two tiny ones for tests),
written out so that ``pefttune inspect --no-weights`` and the tests never touch a model hub.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, BertConfig, CLIPConfig, PretrainedConfig, SiglipConfig

_BERT_BASE: dict[str, Any] = {}  # BertConfig's defaults are bert-base-uncased's published config

_MINILM_L6: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
}

_TINY_BERT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def _clip(patch_size: int) -> dict[str, Any]:
    # CLIPConfig's defaults are ViT-B/32's text and vision towers with a 512-d projection.
    return {"vision_config": {"patch_size": patch_size}}


_TINY_CLIP: dict[str, Any] = {
    "projection_dim": 24,
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    },
    "vision_config": {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}

# SiglipConfig's defaults are google/siglip-base-patch16-224's text and vision towers.
_SIGLIP_BASE: dict[str, Any] = {}

_TINY_SIGLIP: dict[str, Any] = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "projection_size": 24,
    },
    "vision_config": {
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}

KNOWN_ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "bert-base-uncased": (BertConfig, _BERT_BASE),
    "google-bert/bert-base-uncased": (BertConfig, _BERT_BASE),
    "sentence-transformers/all-MiniLM-L6-v2": (BertConfig, _MINILM_L6),
    "all-MiniLM-L6-v2": (BertConfig, _MINILM_L6),
    "openai/clip-vit-base-patch32": (CLIPConfig, _clip(32)),
    "openai/clip-vit-base-patch16": (CLIPConfig, _clip(16)),
    "pefttune/tiny-bert": (BertConfig, _TINY_BERT),
    "pefttune/tiny-clip": (CLIPConfig, _TINY_CLIP),
    "google/siglip-base-patch16-224": (SiglipConfig, _SIGLIP_BASE),
    "pefttune/tiny-siglip": (SiglipConfig, _TINY_SIGLIP),
}


def architecture_config(name: str) -> PretrainedConfig:
    """The config of a Hugging Face model without downloading anything.

    Args:
        name: a key of :data:`KNOWN_ARCHITECTURES`, or a local directory holding a ``config.json``.

    Raises:
        KeyError: when the name is neither known nor a local directory.
    """
    if name in KNOWN_ARCHITECTURES:
        config_class, kwargs = KNOWN_ARCHITECTURES[name]
        return config_class(**kwargs)
    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name)
    known = ", ".join(sorted(KNOWN_ARCHITECTURES))
    raise KeyError(
        f"no architecture-only config for {name!r}: use a local model directory or one of: {known}"
    )


def is_tiny(name: str) -> bool:
    """True for the test architectures that have no real checkpoint."""
    return name.startswith("pefttune/tiny-")
