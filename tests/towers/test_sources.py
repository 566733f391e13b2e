"""Issue 17's tower points: CLIP halves built alone, timm's data config for evaluation transforms."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T1

from pefttune.towers import CLIPImageTower, CLIPTextTower, TimmImageTower, hf_clip


def test_a_clip_image_tower_holds_no_text_weights_and_nothing_is_kept_aside():
    image = CLIPImageTower("pefttune/tiny-clip", pretrained=False)
    assert not any("text" in name for name, _ in image.named_parameters())
    assert not any(
        isinstance(value, dict) and value for name, value in vars(hf_clip).items() if name.startswith("_p")
    )
    reference = weakref.ref(image.model)
    del image
    gc.collect()
    assert reference() is None  # nothing module-level keeps the model alive
    text = CLIPTextTower("pefttune/tiny-clip", pretrained=False)
    assert not any("vision" in name for name, _ in text.named_parameters())
    assert math.isclose(text.pretrained_logit_scale, 1 / 0.07, rel_tol=1e-4)


def test_timm_evaluation_transform_follows_the_model_data_config():
    tower = TimmImageTower("test_vit", pretrained=False, image_size=64)
    config = timm.data.resolve_model_data_config(tower.model)
    transform = tower.image_transform(train=False)
    resize = next(step for step in transform.transforms if isinstance(step, T1.Resize))
    assert resize.size == math.floor(64 / config["crop_pct"])
    assert resize.interpolation.value == config["interpolation"]
    assert transform(Image.new("RGB", (100, 80))).shape == (3, 64, 64)
    # Without augmentation training uses the same deterministic transform (the LiT feature cache relies on it).
    assert tower.train_transform_is_deterministic
    pixels = Image.new("RGB", (90, 70), (10, 200, 30))
    torch.testing.assert_close(tower.image_transform(train=True)(pixels), transform(pixels))
    full = TimmImageTower("test_vit", pretrained=False, image_size=64, crop_pct=1.0).image_transform(
        train=False
    )
    assert next(step for step in full.transforms if isinstance(step, T1.Resize)).size == 64
    with pytest.raises(ValueError, match="crop_pct"):
        TimmImageTower("test_vit", pretrained=False, crop_pct=1.5)
    augmented = TimmImageTower("test_vit", pretrained=False, image_size=64, train_augmentation="crop_flip")
    assert not augmented.train_transform_is_deterministic
    assert augmented.image_transform(train=True)(pixels).shape == (3, 64, 64)
