"""The helpers CLIP, SigLIP, Hugging Face text and open_clip towers share (towers/_hf.py, towers/base.py)."""

import pytest
import torch
from PIL import Image

from pefttune.towers.hf_clip import CLIPImageTower, CLIPTextTower
from pefttune.towers.hf_siglip import SiglipImageTower, SiglipTextTower
from pefttune.towers.hf_text import HFTextTower
from pefttune.towers.open_clip import OpenCLIPImageTower

IMAGE_TOWERS = [
    (CLIPImageTower, "pefttune/tiny-clip", False),
    (SiglipImageTower, "pefttune/tiny-siglip", False),
    (OpenCLIPImageTower, "pefttune-tiny-openclip", None),
]


@pytest.mark.parametrize(("tower_class", "name", "pretrained"), IMAGE_TOWERS)
def test_image_towers_reject_an_unknown_augmentation_by_name(tower_class, name, pretrained):
    with pytest.raises(ValueError, match="train_augmentation must be 'none' or 'crop_flip', got 'flip'"):
        tower_class(name, pretrained=pretrained, train_augmentation="flip")


@pytest.mark.parametrize(("tower_class", "name", "pretrained"), IMAGE_TOWERS)
def test_crop_flip_training_is_random_and_evaluation_deterministic(tower_class, name, pretrained):
    tower = tower_class(name, pretrained=pretrained, train_augmentation="crop_flip", crop_scale=(0.1, 0.2))
    assert not tower.train_transform_is_deterministic
    image = Image.fromarray(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy())
    size = tower.image_size
    torch.manual_seed(0)
    train = [tower.image_transform(train=True)(image) for _ in range(4)]
    assert all(t.shape == (3, size, size) for t in train)
    assert any(not torch.equal(train[0], t) for t in train[1:])  # small random crops differ
    evaluate = tower.image_transform(train=False)
    assert torch.equal(evaluate(image), evaluate(image))
    assert tower_class(name, pretrained=pretrained).train_transform_is_deterministic


@pytest.mark.parametrize(
    ("tower", "layers"),
    [
        (lambda: CLIPTextTower("pefttune/tiny-clip", pretrained=False), "model.encoder.layers"),
        (
            lambda: SiglipTextTower("pefttune/tiny-siglip", pretrained=False, max_length=16),
            "model.encoder.layers",
        ),
        (lambda: HFTextTower("pefttune/tiny-bert", pretrained=False), "model.encoder.layer"),
    ],
)
def test_text_towers_share_checkpointing_width_and_lazy_tokenizer(tower, layers):
    tower = tower()
    assert tower.feature_width == tower.model.config.hidden_size
    assert all(block.name.startswith(layers) for block in tower.blocks())
    tower.set_gradient_checkpointing(True)
    assert tower.gradient_checkpointing and tower.model.is_activation_checkpointing
    assert tower._tokenizer is None  # nothing loaded until first use
    ids = tower.tokenize(["a red circle"])["input_ids"]
    assert ids.shape[0] == 1 and tower._tokenizer is tower.tokenizer
